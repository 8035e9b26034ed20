"""Head masks, batched per-head evaluation, selection rules, the table and the command."""

import importlib.util
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from vitreg_jax import config_lib
from vitreg_jax import errors
from vitreg_jax import models
from vitreg_jax import roles as roles_lib
from vitreg_jax.heads import __main__ as heads_main
from vitreg_jax.heads import evaluate as evaluate_lib
from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.heads import search
from vitreg_jax.heads import select as select_lib
from vitreg_jax.heads import summary as summary_lib
from vitreg_jax.heads import training as training_lib
from vitreg_jax.training import rundir

import testutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
  model = models.create("vit", 3, width=16, depth=2, mlp_dim=32, num_heads=4, patch_size=4)
  x = np.random.RandomState(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
  # The slow reference: one model call per mask (jitted once: masks are array arguments).
  apply = jax.jit(lambda v, images, mask: model.apply(v, images, head_mask=mask))
  return model, testutil.np_init(model, x), x, apply


def test_head_masks_and_parse_layers():
  alone, index = masks_lib.head_masks(3, 4, (2,), "alone")
  assert alone.shape == (4, 3, 4) and index == [(2, h) for h in range(4)]
  np.testing.assert_array_equal(alone[1][2], [0, 1, 0, 0])
  np.testing.assert_array_equal(alone[1][:2], np.ones((2, 4)))
  removed, _ = masks_lib.head_masks(3, 4, (0, 2), "removed")
  assert removed.shape == (8, 3, 4) and removed[5].sum() == 11 and removed[5][2, 1] == 0
  assert masks_lib.parse_layers("-1", 4) == (3,) and masks_lib.parse_layers("all", 3) == (0, 1, 2)
  assert masks_lib.parse_layers("0,-1", 4) == (0, 3)
  with pytest.raises(ValueError, match="outside the model's 4 blocks"):
    masks_lib.parse_layers(4, 4)


def test_head_alone_is_the_layer_with_the_others_masked_and_rescaled(tiny):
  model, variables, x, apply = tiny
  _, full = apply(variables, x, np.ones((2, 4), np.float32))
  for layer in range(2):
    alone, index = masks_lib.head_masks(2, 4, (layer,), "alone")
    for mask, (_, h) in zip(alone, index):
      _, out = apply(variables, x, mask)
      z_full = np.asarray(full[f"block{layer}"]["head_out"])
      z = np.asarray(out[f"block{layer}"]["head_out"])
      expected = np.zeros_like(z_full)
      expected[:, :, h] = 4 * z_full[:, :, h]  # Rescaled by heads / kept = 4 / 1.
      np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
      if layer == 1:  # The blocks before the masked one are untouched.
        np.testing.assert_allclose(out["block0"]["output"], full["block0"]["output"],
                                   rtol=1e-6)


def test_batched_masks_equal_one_evaluation_per_mask_with_one_compilation(tiny):
  model, variables, x, apply = tiny
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  alone, _ = masks_lib.head_masks(2, 4, (0, 1), "alone")
  removed, _ = masks_lib.head_masks(2, 4, (1,), "removed")
  masks = np.concatenate([np.ones((1, 2, 4), np.float32), alone, removed])  # 13 masks
  evaluator = evaluate_lib.MaskEvaluator(model, masks_per_pass=5)
  pred, loss, confidence = evaluator(variables, x, labels, masks)
  assert pred.shape == loss.shape == confidence.shape == (13, 6)
  for i, m in enumerate(masks):
    logits, _ = apply(variables, x, m)
    np.testing.assert_array_equal(pred[i], np.argmax(logits, -1))
    ref = -jax.nn.log_softmax(logits)[np.arange(6), labels]
    np.testing.assert_allclose(loss[i], ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(confidence[i], jax.nn.softmax(logits).max(-1), rtol=1e-5)
  evaluator(variables, x + 1.0, labels, masks[:1])  # Fewer masks, new data: same shapes.
  assert evaluator.traces == 1


def test_masks_of_several_layers_pass_from_the_block_they_change(tiny):
  """`--layer=all`: a pass of masks that change only block 1 runs block 0 once per image."""
  model, variables, x, apply = tiny
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  alone, _ = masks_lib.head_masks(2, 4, (0, 1), "alone")
  removed, _ = masks_lib.head_masks(2, 4, (0, 1), "removed")
  masks = np.concatenate([np.ones((1, 2, 4), np.float32), alone, removed])
  masks = masks[np.random.RandomState(0).permutation(len(masks))]  # 17 masks, layers mixed.
  evaluator = evaluate_lib.MaskEvaluator(model, layers=(0, 1), masks_per_pass=4)
  starts, plan = [], evaluator.mask_passes

  def recorded_plan(m):  # Each pass's first block, as the call plans its passes.
    order, pass_starts = plan(m)
    starts.extend(pass_starts)
    return order, pass_starts
  evaluator.mask_passes = recorded_plan
  pred, loss, _ = evaluator(variables, x, labels, masks)
  for i, m in enumerate(masks):
    logits, _ = apply(variables, x, m)
    np.testing.assert_array_equal(pred[i], np.argmax(logits, -1))
    ref = -jax.nn.log_softmax(logits)[np.arange(6), labels]
    np.testing.assert_allclose(loss[i], ref, rtol=1e-4, atol=1e-5)
  # 8 masks change block 0 (2 passes from block 0); 9 only block 1 (3 passes from block 1).
  assert starts == [0, 0, 1, 1, 1] and evaluator.traces == 2
  evaluator(variables, x, labels, masks[::-1])  # Another order: the same two functions.
  assert evaluator.traces == 2


def _additive_score(weights):
  return lambda masks: np.einsum("mlh,lh->m", masks, weights)


def test_greedy_search_finds_the_known_subset():
  weights = np.zeros((2, 4))
  weights[1] = [0.3, -0.2, 0.5, -0.1]  # Heads 0 and 2 of layer 1 help, 1 and 3 hurt.
  mask, score, path = search.greedy_search(_additive_score(weights), np.ones((2, 4)), (1,))
  np.testing.assert_array_equal(mask[1], [1, 0, 1, 0])
  np.testing.assert_array_equal(mask[0], np.ones(4))
  assert score == pytest.approx(0.8) and len(path) == 3  # Removes 1 then 3.
  # A non-additive score: closeness to a target subset, reached from a single head.
  target = np.array([[1, 1, 1, 1], [0, 1, 1, 0]], np.float32)
  score_fn = lambda masks: -np.abs(masks - target).sum(axis=(1, 2))
  start = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
  mask, score, _ = search.greedy_search(score_fn, start, (1,))
  np.testing.assert_array_equal(mask, target)
  assert score == 0


def _fake_heads(ood, conflict):
  rows = []
  for h, (o, c) in enumerate(zip(ood, conflict)):
    rows.append({"layer": 1, "head": h, "alone": {
        "val_ood": {"accuracy": o},
        "val_id": {"accuracy": 0.9, "conflict_accuracy": c, "conflict_spurious_accuracy": 1 - c}}})
  return rows


def test_selection_rules_on_known_heads():
  roles = roles_lib.split_roles(("train", "val_id", "val_ood", "test_id", "test_ood"))
  rows = _fake_heads(ood=[0.6, 0.8, 0.7, 0.5], conflict=[0.3, 0.7, 0.6, 0.2])
  full = np.ones((2, 4), np.float32)
  full_metrics = {"val_id": {"conflict_accuracy": 0.0}}
  score = lambda value: (lambda masks, split: [{"conflict_accuracy": value}] * len(masks))
  select = lambda rule, heads=rows, **kw: select_lib.select(
      rule, heads, roles, full, full_metrics, layers=(1,), score_masks=score(0.9), **kw)
  mask, info = select("oracle")
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [0, 1, 0, 0]])
  assert info["head"] == 1 and info["score"] == 0.8
  mask, info = select("topk", k=2)
  np.testing.assert_array_equal(mask[1], [0, 1, 1, 0])
  mask, _ = select("topk", k=1, topk_score="id_conflict")
  np.testing.assert_array_equal(mask[1], [0, 1, 0, 0])
  # id_conflict: the candidate (full model or head alone) with the best accuracy on the ID
  # validation examples whose attribute disagrees with the label, the same in --table.
  mask, info = select("id_conflict")
  np.testing.assert_array_equal(mask[1], [0, 1, 0, 0])
  assert info["chosen"] == "layer 1 head 1" and info["score"] == 0.7
  # conflict_vote also scores the kept combination (here 0.9) beside the full model (0.0) and
  # each head alone, and keeps the best.
  mask, info = select("conflict_vote")
  np.testing.assert_array_equal(mask[1], [0, 1, 1, 0])  # Conflict accuracy above 0.5.
  mask, _ = select("conflict_vote", _fake_heads([0.5] * 4, [0.1, 0.4, 0.2, 0.3]))
  np.testing.assert_array_equal(mask[1], [0, 1, 0, 0])  # None good: keep the best one.
  with pytest.raises(errors.UserError, match="reads ID validation attribute"):
    select_lib.select("id_conflict", [{"layer": 1, "head": 0, "alone": {"val_id": {}}}], roles,
                      full, {"val_id": {"accuracy": 1.0}})
  grouped = roles_lib.split_roles(("train", "val", "test"), ("place", "group"))
  assert (grouped.id_metric, grouped.ood_metric) == ("train_weighted_mean_accuracy",
                                                     "mean_group_accuracy")
  with pytest.raises(ValueError, match="Cannot tell"):
    roles_lib.split_roles(("train", "test"))


def test_load_head_mask_from_array_file_and_run_dir(tmp_path):
  mask = np.array([[1, 1], [0, 1]], np.float32)
  path = masks_lib.save_head_mask(mask, str(tmp_path), rule="oracle")
  for value in (mask.tolist(), path, str(tmp_path)):
    np.testing.assert_array_equal(masks_lib.load_head_mask(value, (2, 2)), mask)
  with pytest.raises(ValueError, match=r"expects \[depth, heads\] = \(3, 2\)"):
    masks_lib.load_head_mask(path, (3, 2))
  with pytest.raises(ValueError, match="masks every head of layer"):
    masks_lib.load_head_mask([[1, 1], [0, 0]], (2, 2))
  with pytest.raises(FileNotFoundError, match="vitreg_jax.heads"):
    masks_lib.load_head_mask(str(tmp_path / "none.json"), (2, 2))


def _quickstart_config(**overrides):
  spec = importlib.util.spec_from_file_location("quickstart",
                                                os.path.join(ROOT, "configs", "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
  config.data.update(num_train=256, num_val=100, num_test=100)
  config.update({**dict(batch_size=32, eval_batch_size=100, total_steps=6, eval_every_steps=3,
                        checkpoint_every_steps=6, log_every_steps=3, head_eval="all"),
                 **overrides})
  return config


def test_command_writes_json_md_png_from_a_quickstart_run(tmp_path):
  from vitreg_jax.training import train  # pylint: disable=g-import-not-at-top
  workdir, out = str(tmp_path / "run"), str(tmp_path / "out")
  train.train_and_evaluate(_quickstart_config(), workdir)
  logged = training_lib.read_head_eval(workdir)  # 2 evals x 4 splits x (full + 4 heads alone).
  assert len(logged) == 2 * 4 * 5 and {r["step"] for r in logged} == {3, 6}
  assert heads_main.main([f"--workdir={workdir}", "--layer=all", "--select=greedy", "--out", out,
                     "--no_progress"]) == 0
  result = json.load(open(os.path.join(out, "heads.json")))
  assert result["rule"] == "greedy" and np.asarray(result["mask"]).shape == (2, 2)
  assert result["compilations"] == 1  # 9 masks x 4 splits, greedy rounds, selected: 1 jit.
  assert len(result["heads"]) == 4 and {"layer", "head", "accuracy", "spurious_accuracy"} <= \
      set(result["heads"][0])
  assert set(result["heads"][0]["accuracy"]) == {"val_id", "val_ood", "test_id", "test_ood"}
  assert set(result["full"]) == set(result["selected"]) == set(result["heads"][0]["accuracy"])
  # The unmasked figures equal the training loop's own final evaluation.
  final = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  assert result["full"][final["split"]]["accuracy"] == pytest.approx(final["accuracy"])
  assert result["epoch_oracle"]["step"] in (3, 6)
  assert "| Layer | Head |" in open(os.path.join(out, "heads.md")).read()
  assert open(os.path.join(out, "heads.png"), "rb").read(4) == b"\x89PNG"
  # The saved mask is what config.head_mask reads.
  np.testing.assert_array_equal(masks_lib.load_head_mask(out, (2, 2)), result["mask"])
  # One meaning per rule: on the final checkpoint, --select=id_conflict chooses what the
  # table's id_conflict row chooses at the last evaluation (the same weights).
  assert heads_main.main([f"--workdir={workdir}", "--layer=all", "--select=id_conflict",
                          "--out", out, "--no_progress"]) == 0
  selection = json.load(open(os.path.join(out, "heads.json")))["selection"]
  roles = roles_lib.split_roles(result["splits"])
  row = summary_lib.summarize(logged, roles, ("id_conflict",), "final")["id_conflict"]
  assert (selection["kind"], selection["layer"], selection["head"]) == \
      (row["kind"], row["layer"], row["head"])
  assert selection["score"] == pytest.approx(row["score"])


def test_training_refuses_a_head_mask_of_the_wrong_shape_before_compute(tmp_path):
  from vitreg_jax.training import train  # pylint: disable=g-import-not-at-top
  bad = _quickstart_config(head_mask=np.ones((3, 2)).tolist(), head_eval="")
  with pytest.raises(ValueError, match=r"\[depth, heads\] = \(2, 2\)"):
    train.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_greedy_search_compiles_the_mask_evaluator_once(tiny):
  """Greedy's rounds (candidate counts that change, one-mask scores) reuse one compilation."""
  model, variables, _, _ = tiny
  x = np.random.RandomState(1).normal(size=(48, 8, 8, 3)).astype(np.float32)
  labels = np.arange(48, dtype=np.int32) % 3
  evaluator = evaluate_lib.MaskEvaluator(model, layers=(1,), masks_per_pass=3,
                                         images_per_pass=20)
  full = np.ones((2, 4), np.float32)
  target = full.copy()
  target[1, 2] = 0.0  # Greedy's score peaks (at 0) at this mask, one flip from the start.
  target_loss = evaluator(variables, x, labels, target[None])[1][0]
  calls = []

  def score_fn(masks):
    calls.append(len(masks))
    loss = evaluator(variables, x, labels, masks)[1]
    return -np.abs(loss - target_loss).mean(axis=1)

  mask, score, path = search.greedy_search(score_fn, full, (1,))
  np.testing.assert_array_equal(mask, target)
  assert len(path) == 2 and score == pytest.approx(0.0, abs=1e-6) and path[0][1] < -1e-3
  assert calls[0] == 1 and len(calls) == 3  # Start, a round that moves, one that stops.
  assert evaluator.traces == 1 and evaluator.expand_at == 1


def test_run_eval_reads_the_splits_once_and_scores_each_mask_once_per_weights(monkeypatch):
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  config = _quickstart_config()
  reads = []
  make = data.Dataset.eval_iterator
  monkeypatch.setattr(data.Dataset, "eval_iterator",
                      lambda self, split, **k: reads.append(split) or make(self, split, **k))
  model = models.create("vit", 2, **config.model.to_dict())
  variables = testutil.np_init(model, np.zeros((1, 32, 16, 3), np.float32))
  run_eval = evaluate_lib.RunEval(model, variables, config, data.open(config.data),
                                  ("val_id", "val_ood"), layers=(1,))
  predict, scorings = run_eval.evaluator.predict, []  # One entry per call that scores.
  run_eval.evaluator.predict = lambda *a, **k: scorings.append(1) or predict(*a, **k)
  masks = np.concatenate([np.ones((1, 2, 2), np.float32),
                          masks_lib.head_masks(2, 2, (1,), "alone")[0]])
  first = run_eval(masks)
  assert scorings and first["val_id"][0]["num_examples"] == 100
  scored = len(scorings)
  again = run_eval(masks[::-1], ["val_ood"])  # Already scored: nothing to score.
  assert again["val_ood"] == first["val_ood"][::-1] and len(scorings) == scored
  run_eval.variables = variables  # New weights: scored again, from the data read before.
  assert run_eval(masks[:1], ["val_ood"])["val_ood"][0] == first["val_ood"][0]
  assert len(scorings) > scored and reads == ["val_id", "val_ood"]
  assert run_eval.evaluator.traces == 1
