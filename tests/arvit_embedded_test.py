"""The ARViT chain on embedded data, as a user runs it: rotation pretraining, then fine-tuning
from it (`init=`), each `python -m vitreg_jax.main` for two steps at the runlocal size."""

import os
import subprocess
import sys

import numpy as np

from vitreg_jax.training import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(arg, workdir):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
      [sys.executable, "-m", "vitreg_jax.main", f"--config=configs/arvit.py:{arg}",
       f"--workdir={workdir}", "--config.total_steps=2", "--config.eval_every_steps=2",
       "--config.checkpoint_every_steps=2"],
      cwd=ROOT, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return rundir.load_run(str(workdir))


def test_rotation_pretraining_then_fine_tuning_from_it(tmp_path):
  pre = train("variant=L2,dataset=embedded_rotation,runlocal", tmp_path / "rot")
  fine = train(f"variant=L2,dataset=embedded,init={tmp_path / 'rot'},runlocal",
               tmp_path / "fine")
  assert pre.step == fine.step == 2
  assert (pre.num_classes, fine.num_classes) == (4, 10)
  assert fine.config.init_from.path == str(tmp_path / "rot")
  assert fine.config.regularizers[0]["name"] == "distance"
  # The encoder starts from the pretrained weights (two Adam steps of lr 1e-3 move each
  # weight by about 2e-3 at most), the head was re-initialized for the 10 classes.
  before = pre.variables["params"]["Transformer"]
  after = fine.variables["params"]["Transformer"]
  kernel = lambda p: np.asarray(p["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]
                                ["kernel"])
  assert np.abs(kernel(after) - kernel(before)).max() < 5e-3
  assert fine.variables["params"]["head"]["kernel"].shape[-1] == 10
