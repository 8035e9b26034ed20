"""`config.init_from` with FSDP across two processes (gloo CPU collectives on localhost).

The parameters are split over the processes, so no process can `device_get` them whole; the
state initialized from another run's checkpoint, and from a .npz, must equal the source.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from vitreg_jax import config_lib, data, sharding
from vitreg_jax.models import convert
from vitreg_jax.training import checkpoint as ckpt_lib
from vitreg_jax.training import optim
from vitreg_jax.training import steps

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "workers", "init_from_worker.py")
sys.path.insert(0, os.path.join(HERE, "workers"))
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position
from testutil import TINY_TRAIN  # pylint: disable=g-import-not-at-top,wrong-import-position


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _source_run(workdir):
  """A checkpoint of the same model with another seed (so it differs from a fresh init)."""
  config = config_lib.with_defaults(train_worker.load_config({**TINY_TRAIN, "seed": 3}))
  info = data.open(config.data).info
  model = steps.create_model(config, info.num_classes)
  tx, _ = optim.make_optimizer(config, config.total_steps)
  state, _ = steps.create_train_state(config, model, tx, info.image_shape,
                                      sharding.make_mesh())
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as checkpointer:
    checkpointer.save(5, state, ckpt_lib.run_meta(config, 5), force=True)
  return convert.flatten(state.params)


def test_init_from_checkpoint_and_npz_with_fsdp_across_two_processes(tmp_path):
  source = _source_run(tmp_path / "source")
  doubled = {k: 2 * v for k, v in source.items()}
  np.savez(tmp_path / "doubled.npz", **doubled)
  sources = [{"path": str(tmp_path / "source")},
             {"path": str(tmp_path / "doubled.npz"), "kind": "npz"}]
  coordinator = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, WORKER, str(tmp_path), json.dumps(sources),
       f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu")) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  split = [json.loads(l.split("SPLIT ", 1)[1]) for l in outs[0][0].splitlines()
           if l.startswith("SPLIT ")]
  # The test means something only if arrays really were split across the processes.
  assert len(split) == 2 and all(s["processes"] == 2 and s["params"] > 0
                                 and s["opt_state"] >= 0 for s in split), split
  for i, want in enumerate((source, doubled)):
    with np.load(tmp_path / f"{i}.npz") as got:
      assert set(got.files) == set(want)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"source {i}: {k}")
