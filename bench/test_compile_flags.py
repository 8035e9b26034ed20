"""XLA:CPU compile time of a test-sized train step under the flag sets the test suite could use.

The suite (tests/conftest.py) compiles hundreds of tiny models: there compile time, not run
time, is what a test costs. Each flag set runs in a fresh process with the persistent
compilation cache off, so every figure is a cold compile:
  init_s     create_train_state (the model's init, jitted);
  compile_s  a ViT (width 32, depth 2, 4 heads) train step with DIV's double backprop, AdamW;
  run_s      `--steps` (20) steps of the compiled function (the code the flags generate);
  loss       the loss after them (no fast-math under any set: the levels may differ in the
             last digits, as any two compilations may).

  python bench/test_compile_flags.py            # JSON on stdout
  python bench/test_compile_flags.py --smoke    # seconds: one flag set, a 2-step probe

`--smoke` runs only the suite's own set (`O0_no_fusion_emitters`) on 2 steps of a batch of 4:
it checks the script runs, its figures mean nothing and no ratio is reported.
"""

import argparse
import json
import os
import subprocess
import sys
import time

FLAG_SETS = {
    "default": "",
    "O0": "--xla_backend_optimization_level=0",
    "O0_no_fusion_emitters": ("--xla_backend_optimization_level=0 "
                              "--xla_cpu_use_fusion_emitters=false"),
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
}


def probe(num_steps: int = 20, batch_size: int = 16):
  """One cold compile and `num_steps` steps on `batch_size` images; prints one JSON line."""
  # pylint: disable=g-import-not-at-top
  import functools
  import jax
  import ml_collections
  import numpy as np
  from vitreg_jax import config_lib, models, sharding
  from vitreg_jax.training import optim
  from vitreg_jax.training import objective as objective_lib
  from vitreg_jax.training import steps
  config = config_lib.with_defaults(ml_collections.ConfigDict(dict(
      total_steps=num_steps, optimizer=dict(name="adamw", lr=1e-3, weight_decay=1e-4),
      regularizers=[dict(name="div", weight=1.0, layers=(-1,))])))
  model = models.create("vit", 2, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4)
  tx, _ = optim.make_optimizer(config, num_steps)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 2, size=batch_size).astype(np.int32)}
  t0 = time.perf_counter()
  state, _ = steps.create_train_state(config, model, tx, batch["image"].shape[1:],
                                      sharding.make_mesh())
  jax.block_until_ready(state)
  t1 = time.perf_counter()
  step = jax.jit(functools.partial(steps.train_step, tx=tx, objective=objective_lib.Objective(
      model, num_classes=2, regularizers=config.regularizers)))
  compiled = step.lower(state, batch).compile()
  t2 = time.perf_counter()
  for _ in range(num_steps):
    state, measured = compiled(state, batch)
  loss = float(measured["loss"])
  t3 = time.perf_counter()
  print(json.dumps(dict(init_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
                        run_s=round(t3 - t2, 2), loss=loss)))


def run_probe(flags: str, num_steps: int, batch_size: int) -> dict:
  """`probe` in a fresh process compiled under XLA_FLAGS=`flags`, cache off; its figures."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_ENABLE_COMPILATION_CACHE="false",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.abspath(__file__), "--probe", "--steps", str(num_steps),
         "--batch", str(batch_size)]
  res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if res.returncode:  # Say why, not only that, the probe stopped.
    raise RuntimeError(f"probe under XLA_FLAGS={flags!r} failed (exit {res.returncode}):\n"
                       + "\n".join(res.stderr.strip().splitlines()[-20:]))
  return json.loads(res.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--flag_sets", default=",".join(FLAG_SETS),
                      help=f"subset of {list(FLAG_SETS)}")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--smoke", action="store_true",
                      help="seconds: O0_no_fusion_emitters only, 2 steps of 4 images")
  args = parser.parse_args(argv)
  if args.smoke:
    args.flag_sets, args.steps, args.batch = "O0_no_fusion_emitters", 2, 4
  unknown = set(args.flag_sets.split(",")) - set(FLAG_SETS)
  if unknown:
    parser.error(f"--flag_sets: unknown {sorted(unknown)}; valid: {list(FLAG_SETS)}")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.probe:
    return probe(args.steps, args.batch)
  results = {name: dict(xla_flags=FLAG_SETS[name],
                        **run_probe(FLAG_SETS[name], args.steps, args.batch))
             for name in args.flag_sets.split(",")}
  if "O0" in results and "O0_no_fusion_emitters" in results:
    results["compile_O0_over_O0_no_fusion_emitters"] = round(
        results["O0"]["compile_s"] / results["O0_no_fusion_emitters"]["compile_s"], 2)
  results["load_average"] = os.getloadavg()
  results["steps"], results["batch"] = args.steps, args.batch
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
