"""JTT end to end on tiny dominoes runs (configs/baselines.py, method=jtt): the identification
run's error set is the training examples it misclassifies, stage 2 writes it when missing and
trains on the upsampled epochs; GroupDRO trains with its weights in the state."""

import json
import os

import numpy as np
import pytest

from vitreg_jax import config_lib
from vitreg_jax.baselines import jtt
from vitreg_jax.training import features
from vitreg_jax.training import preflight
from vitreg_jax.training import run_files
from vitreg_jax.training import rundir
from vitreg_jax.training import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "baselines.py")
TINY = dict(width=16, depth=1, mlp_dim=32, num_heads=2)


def tiny(arg: str):
  config = config_lib.load_config_file(f"{CONFIG}:{arg}")
  config.model.update(TINY)
  config.data.update(num_train=96, num_val=32, num_test=32, num_threads=1)
  config.update(batch_size=16, eval_batch_size=32, eval_every_steps=4,
                checkpoint_every_steps=4, log_every_steps=2)
  config.schedule.warmup_steps = 2
  if config.total_steps > 8:
    config.total_steps = 8
  return config


def test_jtt_two_stages(tmp_path):
  stage1, stage2 = str(tmp_path / "id"), str(tmp_path / "up")
  train.train_and_evaluate(tiny("method=jtt,stage=identify,id_steps=4"), stage1)
  config = tiny(f"method=jtt,stage=upweight,identification={stage1},lambda_up=5")
  assert config.data.sampler == "upsample" and config.data.upsample.factor == 5
  assert config.data.upsample.copies == "authors"  # 6 appearances of each error
  # The command's checks come first (`python -m vitreg_jax.main`): they open the dataset, whose
  # upsampling sampler reads the error set, so they must write it as training does.
  preflight.check(config)
  assert os.path.exists(os.path.join(stage1, jtt.ERROR_SET_FILE))
  train.train_and_evaluate(config, stage2)
  record = json.loads(open(os.path.join(stage1, jtt.ERROR_SET_FILE)).read())
  out = features.extract(rundir.load_run(stage1), "train")
  np.testing.assert_array_equal(record["indices"], np.flatnonzero(out["pred"] != out["label"]))
  assert record["step"] == 4 and record["num_examples"] == 96
  assert sum(record["errors_per_group"]) == record["num_errors"]
  assert run_files.checkpoint_steps(stage2)[-1] == 8


def test_group_dro_run_checkpoints_its_weights(tmp_path):
  train.train_and_evaluate(tiny("method=group_dro,step_size=0.5"), str(tmp_path))
  tree, _ = rundir.load_state_tree(str(tmp_path))
  q = np.asarray(tree["loss_state"]["group_weights"])
  assert q.shape == (4,) and abs(q.sum() - 1) < 1e-5 and not np.allclose(q, 0.25)


def test_lambda_up_is_the_authors_by_default():
  up = lambda extra="": config_lib.load_config_file(
      f"{CONFIG}:method=jtt,stage=upweight,identification=/tmp/w{extra}").data.upsample
  assert (up().factor, up().copies) == (5, "authors")  # = the 6 copies of the earlier runs
  assert (up(",copies=lambda,lambda_up=6").factor, up(",copies=lambda").copies) == (6, "lambda")
  with pytest.raises(ValueError, match="copies must be one of"):
    up(",copies=paper")


def test_config_errors():
  with pytest.raises(ValueError, match="stage=identify or stage=upweight"):
    config_lib.load_config_file(f"{CONFIG}:method=jtt")
  with pytest.raises(ValueError, match="identification=WORKDIR"):
    config_lib.load_config_file(f"{CONFIG}:method=jtt,stage=upweight")
  with pytest.raises(ValueError, match="add method=jtt"):
    config_lib.load_config_file(f"{CONFIG}:method=erm,stage=identify")
