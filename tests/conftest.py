"""One XLA compilation cache for the whole test session, shared by every worker and subprocess.

Many tests compile the same tiny model: a training run and its resumed run in two
subprocesses, one CLI run per option, the in-process reference and the crashed runs of
tests/train_test.py. Each XLA:CPU compile of a train step takes seconds; JAX's persistent
compilation cache (keyed on the exact HLO, compile options and backend) turns every repeat
into a disk read. The cache lives in a fresh directory per session, so a session measures
what CI measures (nothing carried over) and no stale entry is ever read. Setting
JAX_COMPILATION_CACHE_DIR yourself keeps your directory (e.g. to reuse it across sessions).

XLA:CPU compiles in tests at LLVM optimization level 0 and without its newer fusion emitters
(`--xla_cpu_use_fusion_emitters=false`, the classic elemental emitters): a tiny ViT's DIV
train step compiles in 19.4 s at the defaults, 11.6 s at level 0 and 5.8 s at level 0
without the fusion emitters on the 2-core machine (bench/test_compile_flags.py), and the
tests' models are too small for the slower code to matter. Only code generation changes (no
fast-math either way: the same IEEE arithmetic), and every comparison in the suite is between
runs compiled alike. To test at the production settings, set either flag yourself:
`XLA_FLAGS=--xla_backend_optimization_level=2 python -m pytest ...`.

The controller sets the environment before xdist starts its workers, so workers and the
subprocesses tests start (which copy os.environ) all read and write the same directory and
compile alike.
"""

import os
import shutil
import tempfile

# Only compiles that take this long are written: the train/eval steps and model inits,
# not the thousands of one-op compiles of eager code (each would cost a file write).
_MIN_COMPILE_SECS = "0.3"
_OWNED = "_VITREG_TEST_OWNS_JAX_CACHE"
_OPT_LEVEL = "--xla_backend_optimization_level"
_FUSION_EMITTERS = "--xla_cpu_use_fusion_emitters"


def pytest_configure(config):
  if hasattr(config, "workerinput"):  # An xdist worker: the controller set the environment.
    pass
  elif "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vitreg_jax_cache_")
    os.environ[_OWNED] = "1"
  flags = os.environ.get("XLA_FLAGS", "")
  if _OPT_LEVEL not in flags and _FUSION_EMITTERS not in flags:  # Read when the backend
    # starts (no test has run yet).
    os.environ["XLA_FLAGS"] = f"{flags} {_OPT_LEVEL}=0 {_FUSION_EMITTERS}=false".strip()
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", _MIN_COMPILE_SECS)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  import jax  # pylint: disable=g-import-not-at-top
  # In case JAX was imported (by a plugin) before the environment was set.
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
  if not hasattr(config, "workerinput") and os.environ.pop(_OWNED, None):
    shutil.rmtree(os.environ.pop("JAX_COMPILATION_CACHE_DIR"), ignore_errors=True)
