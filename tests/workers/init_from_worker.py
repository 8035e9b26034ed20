"""Worker: `config.init_from` into a train state split across processes by FSDP.

  python init_from_worker.py OUT_DIR '[init_from, ...]' --coordinator=host:port
      --num_processes=P --process_id=I

Builds the quickstart ViT of tests/testutil.py's TINY_TRAIN config with `sharding.fsdp=True`
(`fsdp_min_size=16`, so the weight matrices are split over the processes' devices), then for
each `init_from` runs `pretrained.init_state_from` as the training loop does. Process 0 writes
the resulting params, gathered, to OUT_DIR/<i>.npz and a JSON line saying how many arrays
were split across processes (the test requires some).
"""

import json
import os
import sys

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))


def main():
  out_dir, sources = sys.argv[1], json.loads(sys.argv[2])
  opts = dict(a[2:].split("=", 1) for a in sys.argv[3:] if a.startswith("--"))
  from vitreg_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(opts["coordinator"], int(opts["num_processes"]),
                                        int(opts["process_id"]))
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vitreg_jax import config_lib, data  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import optim  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import pretrained  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import steps  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import train  # pylint: disable=g-import-not-at-top
  from vitreg_jax.models import convert  # pylint: disable=g-import-not-at-top
  import train_worker  # pylint: disable=g-import-not-at-top
  from testutil import TINY_TRAIN  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(train_worker.load_config(
      {**TINY_TRAIN, "sharding": {"fsdp": True, "fsdp_min_size": 16}}))
  info = data.open(config.data).info
  model = steps.create_model(config, info.num_classes)
  tx, _ = optim.make_optimizer(config, config.total_steps)
  mesh = train.make_mesh(config)
  state, shardings = steps.create_train_state(config, model, tx, info.image_shape, mesh)
  for i, init_from in enumerate(sources):
    new = pretrained.init_state_from(init_from, state, shardings, tx=tx, model=model,
                                     image_hw=info.image_shape[:2])
    split = sum(not x.is_fully_addressable and not x.sharding.is_fully_replicated
                for x in jax.tree.leaves(new.params))
    opt_split = sum(not x.is_fully_addressable and not x.sharding.is_fully_replicated
                    for x in jax.tree.leaves(new.opt_state))
    params = multihost_utils.process_allgather(new.params, tiled=True)
    if jax.process_index() == 0:
      np.savez(os.path.join(out_dir, f"{i}.npz"), **convert.flatten(params))
      print("SPLIT " + json.dumps({"params": int(split), "opt_state": int(opt_split),
                                   "processes": jax.process_count()}), flush=True)


if __name__ == "__main__":
  main()
