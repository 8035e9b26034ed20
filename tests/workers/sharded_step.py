"""Worker: train steps of a small ViT on 1 device, 8 devices and 8 devices with FSDP.

SGD with momentum, because Adam divides by sqrt(v): on parameters whose gradients are ~0
(e.g. at a zero-initialized head) it turns float round-off into updates of size lr.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8; prints one JSON line with the
largest differences between the runs (the test asserts on them).
"""

import functools
import json

import jax
import ml_collections
import numpy as np

from vitreg_jax import config_lib, models, sharding as shd
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import optim
from vitreg_jax.training import steps


def run(mesh, fsdp, batch, regularizers=()):
  config = config_lib.with_defaults(ml_collections.ConfigDict(dict(
      total_steps=3, sharding=dict(fsdp=fsdp, fsdp_min_size=16),
      optimizer=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3), regularizers=list(regularizers))))
  model = models.create("vit", 3, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4)
  tx, _ = optim.make_optimizer(config, 3)
  state, sh = steps.create_train_state(config, model, tx, batch["image"].shape[1:], mesh)
  step = jax.jit(functools.partial(steps.train_step, tx=tx, objective=objective_lib.Objective(
      model, num_classes=3, regularizers=config.regularizers)),
      in_shardings=(sh, shd.batch_sharding(mesh)), out_shardings=(sh, shd.replicated(mesh)))
  losses = []
  for _ in range(3):
    state, m = step(state, shd.to_global(batch, mesh))
    losses.append(float(m["loss"]))
  leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
  specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
  return losses, leaves, specs


def main():
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 16, 3)).astype(np.float32),
           "label": rng.integers(0, 3, size=16).astype(np.int32)}
  l1, p1, _ = run(shd.make_mesh(jax.devices()[:1]), False, batch)
  l8, p8, _ = run(shd.make_mesh(), False, batch)
  lf, pf, specs = run(shd.make_mesh(), True, batch)
  diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
  print(json.dumps(dict(
      devices=jax.device_count(), losses_1=l1, losses_8=l8, losses_fsdp=lf,
      loss_diff_8=max(abs(a - b) for a, b in zip(l1, l8)),
      param_diff_8=diff(p1, p8), param_diff_fsdp=diff(p1, pf),
      fsdp_sharded=any("data" in s for s in specs))))


if __name__ == "__main__":
  main()
