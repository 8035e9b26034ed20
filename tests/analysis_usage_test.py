"""No library module defines an absl flag at import: each command defines its own when it runs.

Flags defined at import made every analysis module claim its flag names for the whole process
(two analyses could not share `--split`, hence `--noise_split` and `--calibration_split`) and
made importing a module change the command line of whoever imported it. The commands'
one-line answers to a bad or missing `--workdir` are checked, with every other entry point's,
in tests/bad_input_test.py.
"""

import importlib
import os
import subprocess
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Imports every module of the package but the training command (`vitreg_jax.main`, a command
# module whose flags are its own) and prints the flags any of them defined.
_PROBE = r"""
import importlib, pkgutil
from absl import flags
import vitreg_jax
names = sorted(m.name for m in pkgutil.walk_packages(vitreg_jax.__path__, "vitreg_jax.")
               if m.name != "vitreg_jax.main")
for name in names:
  importlib.import_module(name)
ours = [f for f in flags.FLAGS
        if (flags.FLAGS.find_module_defining_flag(f) or "").startswith("vitreg_jax")]
print("MODULES", len(names))
print("FLAGS", sorted(ours))
"""


def test_no_module_defines_flags_at_import():
  proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, check=False,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "FLAGS []" in proc.stdout, proc.stdout
  modules = int(proc.stdout.split("MODULES ")[1].split()[0])
  assert modules > 50, proc.stdout


def test_each_command_defines_its_documented_flags():
  """`define_flags()` gives each analysis and `data.prepare` the names the docs use, twice
  in one process without a clash (tests call several commands' mains in one process)."""
  for name in ("calibration", "fourier", "hessian", "landscape", "noise", "variance"):
    module = importlib.import_module(f"vitreg_jax.analysis.{name}")
    module.define_flags()
    module.define_flags()
  for name in ("workdir", "step", "out", "batch_size", "seed", "split", "noise_split",
               "calibration_split", "augment_loss", "top_k", "grid_points", "log_scale"):
    assert name in flags.FLAGS, name
