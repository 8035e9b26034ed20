"""XLA:CPU compile time of a test-sized train step under the flag sets the test suite could use.

The suite (tests/conftest.py) compiles hundreds of tiny models: there compile time, not run
time, is what a test costs. Each flag set runs in a fresh process with the persistent
compilation cache off, so every figure is a cold compile:
  init_s     create_train_state (the model's init, jitted);
  compile_s  a ViT (width 32, depth 2, 4 heads) train step with DIV's double backprop, AdamW;
  run20_s    20 steps of the compiled function (the code the flags generate);
  loss       the loss after them (no fast-math under any set: the levels may differ in the
             last digits, as any two compilations may).

  python bench/test_compile_flags.py            # JSON on stdout
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


def probe():
  """One cold compile and 20 steps; prints one JSON line."""
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
      total_steps=20, optimizer=dict(name="adamw", lr=1e-3, weight_decay=1e-4),
      regularizers=[dict(name="div", weight=1.0, layers=(-1,))])))
  model = models.create("vit", 2, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4)
  tx, _ = optim.make_optimizer(config, 20)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
           "label": rng.integers(0, 2, size=16).astype(np.int32)}
  t0 = time.perf_counter()
  state, _ = steps.create_train_state(config, model, tx, batch["image"].shape[1:],
                                      sharding.make_mesh())
  jax.block_until_ready(state)
  t1 = time.perf_counter()
  step = jax.jit(functools.partial(steps.train_step, tx=tx, objective=objective_lib.Objective(
      model, num_classes=2, regularizers=config.regularizers)))
  compiled = step.lower(state, batch).compile()
  t2 = time.perf_counter()
  for _ in range(20):
    state, measured = compiled(state, batch)
  loss = float(measured["loss"])
  t3 = time.perf_counter()
  print(json.dumps(dict(init_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
                        run20_s=round(t3 - t2, 2), loss=loss)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.probe:
    return probe()
  results = {}
  for name, flags in FLAG_SETS.items():
    env = dict(os.environ, XLA_FLAGS=flags, JAX_ENABLE_COMPILATION_CACHE="false",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--probe"], env=env, check=True,
                         capture_output=True, text=True).stdout
    results[name] = dict(xla_flags=flags, **json.loads(out.strip().splitlines()[-1]))
  base = results["O0"]["compile_s"]
  results["compile_O0_over_O0_no_fusion_emitters"] = round(
      base / results["O0_no_fusion_emitters"]["compile_s"], 2)
  results["load_average"] = os.getloadavg()
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
