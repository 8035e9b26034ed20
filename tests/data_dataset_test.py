"""The dataset object (vitreg_jax/data/dataset.py): what `data.open` checks, the two kinds of
split it names, and its one split reader scoring a trained run as training's evaluation and
the head evaluator's full mask do."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax.heads import evaluate as heads_evaluate
from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.training import rundir
from vitreg_jax.training import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMINOES = dict(name="dominoes", num_train=64, num_val=40, num_test=40, num_threads=1)


def test_open_resolves_once_and_names_the_two_kinds_of_split():
  ds = data.open(dict(DOMINOES, eval_splits=("val_id", "val_ood")))
  assert data.open(ds) is ds  # An opened dataset passes through.
  assert ds.config["seed"] == 0 and ds.config["sampler"] == "uniform"  # Defaults filled in.
  assert ds.eval_splits == ("val_id", "val_ood")  # What training evaluates: the config's.
  # Head selection and DFR read every split but the training one, whatever training evaluates.
  assert ds.held_out_splits == ("val_id", "val_ood", "test_id", "test_ood")
  assert data.open(dict(DOMINOES, train_split="train[:50%]")).held_out_splits == \
      ds.held_out_splits
  assert data.open(DOMINOES).eval_splits == ds.info.default_eval_splits
  assert ds.num_examples("val_id") == 40 and ds.info.num_examples["train"] == 64


@pytest.mark.parametrize("config, message", [
    (dict(name="cifar11"), r"Unknown dataset 'cifar11'; valid names: .*'dominoes'"),
    (dict(DOMINOES, bogus=1), r"Unknown data option\(s\) \['bogus'\]"),
    (dict(DOMINOES, eval_splits=("val",)), r"Unknown split 'val' .*valid splits"),
    (dict(DOMINOES, train_split="tain[:6%]"), r"Unknown split 'tain'"),
    (dict(DOMINOES, sampler="balanced"), r"valid samplers"),
    (dict(DOMINOES, mixup=dict(beta=1)), r"Unknown data.mixup option"),
])
def test_user_mistakes_fail_at_open_as_user_errors(config, message):
  with pytest.raises(errors.UserError, match=message):
    data.open(config)


def test_read_split_drops_the_padding_and_keeps_the_order():
  ds = data.open(DOMINOES)
  # Batch 16 over 40 examples: 3 batches, the last padded with 8 copies of example 0.
  out = ds.read_split("val_ood", batch_size=16, images=True,
                      predict=lambda b: {"double": 2 * b["label"]})
  batches = list(ds.eval_iterator("val_ood", global_batch_size=40, process_index=0,
                                  process_count=1))
  assert len(batches) == 1 and batches[0]["mask"].all()
  for key in ("image", "label", "spurious", "group"):
    np.testing.assert_array_equal(out[key], batches[0][key])
  np.testing.assert_array_equal(out["double"], 2 * out["label"])
  assert out["mask"].all() and "image" not in ds.read_split("val_ood", batch_size=16)
  streamed = list(ds.stream_split("val_ood", batch_size=16, max_examples=20))
  assert [len(b["label"]) for b in streamed] == [16, 4]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in streamed]),
                                out["label"][:20])


def _tiny_run(workdir):
  spec = importlib.util.spec_from_file_location(
      "quickstart", os.path.join(ROOT, "configs", "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
  config.data.update(num_train=64, num_val=40, num_test=40, num_threads=1)
  config.update(batch_size=16, eval_batch_size=16, total_steps=4, eval_every_steps=4,
                checkpoint_every_steps=4, log_every_steps=2, head_eval="")
  from vitreg_jax.training import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir)


def test_one_reader_scores_a_run_as_training_and_the_head_evaluator_do(tmp_path):
  workdir = str(tmp_path / "run")
  trained = _tiny_run(workdir)  # Training's own final evaluation (training/evaluation.py).
  run = rundir.load_run(workdir)
  ds = run.dataset
  normalize = ds.normalization

  @jax.jit
  def predict(images, labels):
    logits, _ = run.model.apply(run.variables, steps.model_images(images, normalize),
                                train=False)
    return steps.predictions(logits, labels)

  depth, num_heads = masks_lib.model_shape(run.model)
  heads = heads_evaluate.RunEval(run.model, run.variables, run.config, ds)
  full = heads(np.ones((1, depth, num_heads), np.float32))
  assert set(full) == set(ds.held_out_splits) and set(trained) == set(ds.eval_splits)
  for split in ds.eval_splits:
    out = ds.read_split(split, batch_size=16,
                        predict=lambda b: predict(b["image"], b["label"]))
    mine = ds.metrics(out["pred"], out["loss"], out, confidence=out["confidence"])
    assert mine["num_examples"] == 40 and "train_weighted_mean_accuracy" in mine
    assert set(mine) == set(trained[split]) == set(full[split][0])
    assert mine["mean_confidence"] == pytest.approx(float(np.mean(out["confidence"])), rel=1e-5)
    for key, value in mine.items():
      assert trained[split][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (split, key)
      assert full[split][0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (split, key)
  logged = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {l["split"] for l in logged if l.get("step") == 4} >= set(ds.eval_splits)
