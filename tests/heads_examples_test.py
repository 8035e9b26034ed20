"""The per-example validation outputs the per-eval head evaluation writes (heads/examples.py)."""

import os

import numpy as np
import pytest

from vitreg_jax.heads import examples as examples_lib
from vitreg_jax.heads import training as training_lib

import testutil


def _quickstart_config(**overrides):
  config = testutil.load_config_module("quickstart").get_config("runlocal")
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
  config.data.update(num_train=128, num_val=60, num_test=40)
  config.update(dict(batch_size=32, eval_batch_size=64, total_steps=2, eval_every_steps=1,
                     checkpoint_every_steps=2, log_every_steps=1, head_eval="all", **overrides))
  config.schedule.warmup_steps = 1
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from vitreg_jax.training import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(_quickstart_config(), workdir)
  return workdir


def test_a_tiny_run_writes_the_validation_examples_of_every_eval(run):
  assert examples_lib.steps(run) == (1, 2)
  raw = np.load(os.path.join(run, "heads_examples", "step_00000002.npz"))
  # Validation splits only; the stored dtypes are the cheap ones.
  assert {k.split(".")[0] for k in raw.files} - {"kind", "layer", "head"} == {"val_id", "val_ood"}
  assert raw["val_id.pred"].dtype == np.int16 and raw["val_id.confidence"].dtype == np.float16
  assert raw["val_ood.label"].dtype == np.int16 and raw["val_ood.pred"].shape == (5, 60)
  records = training_lib.read_head_eval(run)
  for step in (1, 2):
    got = examples_lib.load(run, step)
    # The order of that step's heads_eval.jsonl lines: full, then each head alone.
    lines = [r for r in records if r["step"] == step and r["split"] == "val_ood"]
    assert got["keys"] == [(r["kind"], r["layer"], r["head"]) for r in lines]
    assert got["keys"][0] == ("full", None, None) and len(got["keys"]) == 5
    for split in ("val_id", "val_ood"):
      arrays = got[split]
      assert {"pred", "confidence", "label"} <= set(arrays) and len(arrays) > 3  # attributes
      lines = [r for r in records if r["step"] == step and r["split"] == split]
      # Each candidate's per-example outputs give its logged figures.
      np.testing.assert_allclose((arrays["pred"] == arrays["label"]).mean(1),
                                 [r["accuracy"] for r in lines])
      np.testing.assert_allclose(arrays["confidence"].mean(1),
                                 [r["mean_confidence"] for r in lines], atol=1e-3)
      assert ((arrays["confidence"] >= 0.49) & (arrays["confidence"] <= 1.0)).all()  # 2 classes


def test_a_resumed_run_drops_the_files_past_its_start_step(tmp_path):
  writer = examples_lib.ExamplesWriter(str(tmp_path))
  arrays = examples_lib.pack([("full", None, None), ("alone", 1, 0)], {
      "val_id": {"pred": np.zeros((2, 3)), "confidence": np.full((2, 3), 0.7),
                 "label": np.ones(3), "group": np.arange(3)}})
  for step in (3, 6, 9):
    writer.write(step, arrays)
  assert examples_lib.steps(str(tmp_path)) == (3, 6, 9)
  examples_lib.ExamplesWriter(str(tmp_path), start_step=6)  # Resumed from step 6's checkpoint.
  assert examples_lib.steps(str(tmp_path)) == (3, 6)
  got = examples_lib.load(str(tmp_path), 6)
  assert got["keys"] == [("full", None, None), ("alone", 1, 0)]
  np.testing.assert_allclose(got["val_id"]["confidence"], 0.7, atol=1e-3)
  np.testing.assert_array_equal(got["val_id"]["group"], [0, 1, 2])
  assert sorted(os.listdir(tmp_path / "heads_examples")) == ["step_00000003.npz",
                                                              "step_00000006.npz"]


def test_a_run_without_files_has_no_steps(tmp_path):
  assert examples_lib.steps(str(tmp_path)) == () and examples_lib.read(str(tmp_path)) == {}
