"""The run directory: the saved config round-trips and `load_run` rebuilds the trained model."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from vitreg_jax import config_lib
from vitreg_jax import models
from vitreg_jax.training import run_files
from vitreg_jax.training import rundir


def test_config_round_trip_and_missing_config(tmp_path):
  config = config_lib.with_defaults(ml_collections.ConfigDict(dict(
      total_steps=3, model=dict(width=8, depth=1, num_heads=2, mlp_dim=16),
      data=dict(name="dominoes", eval_splits=("val_id", "val_ood")),
      head_mask=np.ones((1, 2), np.float32))))
  rundir.save_config(config, str(tmp_path))
  loaded = rundir.load_config(str(tmp_path))
  assert loaded.total_steps == 3 and loaded.model.to_dict() == config.model.to_dict()
  assert list(loaded.data.eval_splits) == ["val_id", "val_ood"]
  assert np.asarray(loaded.head_mask).shape == (1, 2)
  assert json.load(open(run_files.config_path(str(tmp_path))))["total_steps"] == 3
  with pytest.raises(FileNotFoundError, match="not a vitreg_jax run directory"):
    rundir.load_config(str(tmp_path / "nothing"))


def test_load_run_rebuilds_model_and_reads_checkpoint(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(ml_collections.ConfigDict(dict(
      total_steps=3, model=dict(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4))))
  rundir.save_config(config, str(tmp_path))
  model = models.create("vit", 3, **config.model.to_dict())
  x = np.ones((2, 8, 8, 3), np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)  # Head no longer zero.
  tree = {"step": np.int32(7), "params": params, "opt_state": {}, "model_state": {},
          "rng": np.zeros(2, np.uint32)}
  ocp.PyTreeCheckpointer().save(str(tmp_path / "checkpoints" / "7" / "state"), tree)
  assert run_files.checkpoint_steps(str(tmp_path)) == [7]
  run = rundir.load_run(str(tmp_path))
  assert run.step == 7 and run.num_classes == 3
  np.testing.assert_allclose(run.model.apply(run.variables, x)[0],
                             model.apply({"params": params}, x)[0], rtol=1e-6)
  with pytest.raises(FileNotFoundError, match="found steps"):
    rundir.load_run(str(tmp_path), step=5)
