"""Head selection: the rules, the analysis of one run, and the epoch oracle.

Selection rules (`RULES`; validation splits only, test figures are reported, never used),
named by what they read:
* OOD validation labels: `oracle` (the authors': the single head with the best OOD validation
  accuracy; the ceiling), `greedy` (flip one head at a time while OOD validation accuracy
  improves), `topk` (the k best heads by a per-head score, `--topk_score=ood`);
* attribute (group) labels of ID validation data, no OOD split: `id_conflict` (on the ID
  validation examples whose spurious attribute disagrees with the label, keep the heads that
  follow the label more often than the attribute; that combination, the full model and each
  head alone are scored there and the best is chosen) and `topk --topk_score=id_conflict`;
* ID validation images and labels only: `id_val` (the full model or a head alone, whichever
  has the best ID validation accuracy; also the baselines table's no-group-label rule);
* group labels of ID validation data: `worst_group` (the head alone with the best
  worst-group accuracy on the ID validation split).
Which split is ID and OOD: `roles.split_roles`.

`analyze(workdir)` evaluates every head of a run's checkpoint (heads/evaluate.py), applies a
rule and returns the `heads.json` dict; `epoch_oracle` makes the authors' choice of epoch
and head from the per-eval figures a run logged (heads/summary.py has the statistics).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence

import numpy as np

from vitreg_jax import checks
from vitreg_jax import errors
from vitreg_jax.heads import evaluate
from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.heads import summary
from vitreg_jax.roles import Roles
from vitreg_jax.roles import split_roles
from vitreg_jax.training import rundir

RULES = ("oracle", "greedy", "topk", "id_conflict", "id_val", "worst_group")
TOPK_SCORES = ("ood", "id_conflict")


def greedy_search(score_fn: Callable[[np.ndarray], np.ndarray], start, layers: Sequence[int],
                  *, min_gain: float = 0.0) -> tuple[np.ndarray, float, list]:
  """Hill climbing over head subsets: flip (add or remove) one head of `layers` at a time.

  Each round scores every mask that differs from the current one by one head of `layers`
  (never masking a whole layer) in a single `score_fn` call and moves to the best one while
  it improves the score by more than `min_gain`; it stops at a local optimum.

  Args:
    score_fn: masks `[M, depth, heads]` -> scores `[M]` (e.g. OOD validation accuracy).
    start: the first mask `[depth, heads]`.
    layers: the layers whose heads may change.
  Returns:
    `(mask, score, path)`; `path` lists `(mask, score)` after each accepted move.
  """
  mask = np.asarray(start, np.float32).copy()
  best = float(score_fn(mask[None])[0])
  path = [(mask.copy(), best)]
  while True:
    candidates = []
    for layer in layers:
      for head in range(mask.shape[1]):
        m = mask.copy()
        m[layer, head] = 1.0 - m[layer, head]
        if m[layer].sum() > 0:
          candidates.append(m)
    if not candidates:
      break
    scores = np.asarray(score_fn(np.stack(candidates)), np.float64)
    i = int(np.argmax(scores))
    if scores[i] <= best + min_gain:
      break
    mask, best = candidates[i], float(scores[i])
    path.append((mask.copy(), best))
  return mask, best, path


def _score(metrics: dict, key: str) -> float:
  value = metrics.get(key)
  return float("nan") if value is None else float(value)


def select_best_head(heads: list[dict], split: str, metric: str,
                     full_mask) -> tuple[np.ndarray, dict]:
  """The single head (alone; the rest of its layer masked) with the best `metric` on `split`.

  Raises:
    ValueError: when no head has `metric` on `split` (e.g. worst-group without groups).
  """
  scores = [_score(h["alone"].get(split, {}), metric) for h in heads]
  if not heads or np.isnan(scores).all():
    raise errors.UserError(f"No head has {metric!r} on split {split!r} (a dataset without groups "
                     "has no worst_group_accuracy): use another --select.")
  best = heads[int(np.nanargmax(scores))]
  mask = np.array(full_mask, np.float32)
  mask[best["layer"]] = 0.0
  mask[best["layer"], best["head"]] = 1.0
  return mask, {"layer": best["layer"], "head": best["head"], "score": float(np.nanmax(scores)),
                "split": split, "metric": metric}


def select_oracle(heads: list[dict], roles: Roles, full_mask) -> tuple[np.ndarray, dict]:
  """The authors' oracle: the single head (alone) with the best OOD validation score."""
  return select_best_head(heads, roles.val_ood, roles.ood_metric, full_mask)


def select_topk(heads: list[dict], roles: Roles, full_mask, *, k: int | None = None,
                score: str = "ood") -> tuple[np.ndarray, dict]:
  """Keeps, in each evaluated layer, the `k` heads with the best per-head score.

  `score='ood'`: head-alone OOD validation accuracy; `'id_conflict'`: head-alone accuracy on
  the ID validation examples whose spurious attribute disagrees with the label (no OOD data).
  `k` defaults to half the heads (rounded up).
  """
  checks.check_choice("topk score", score, TOPK_SCORES)
  mask = np.array(full_mask, np.float32)
  k = k or math.ceil(mask.shape[1] / 2)
  if not 1 <= k <= mask.shape[1]:
    raise errors.UserError(f"--k must be in 1..{mask.shape[1]} (the heads per layer), got {k}.")
  kept = {}
  for layer in sorted({h["layer"] for h in heads}):
    rows = [h for h in heads if h["layer"] == layer]
    values = [_score(h["alone"][roles.val_ood], roles.ood_metric) if score == "ood"
              else _score(h["alone"][roles.val_id], "conflict_accuracy") for h in rows]
    order = np.argsort(-np.nan_to_num(np.asarray(values), nan=-np.inf), kind="stable")[:k]
    mask[layer] = 0.0
    mask[layer, [rows[i]["head"] for i in order]] = 1.0
    kept[layer] = sorted(rows[i]["head"] for i in order)
  return mask, {"k": k, "score": score, "kept": kept}


def _alone_mask(full_mask, layer: int, head: int) -> np.ndarray:
  mask = np.array(full_mask, np.float32)
  mask[layer] = 0.0
  mask[layer, head] = 1.0
  return mask


def _best_candidate(candidates: list[tuple[str, np.ndarray, float]]):
  """The first candidate `(name, mask, score)` with the best score (NaN never wins)."""
  scores = np.nan_to_num(np.array([c[2] for c in candidates], np.float64), nan=-np.inf)
  return candidates[int(np.argmax(scores))]


def select_id_conflict(heads: list[dict], roles: Roles, full_mask, full: dict,
                       score_masks) -> tuple[np.ndarray, dict]:
  """A rule that reads attribute (group) labels of ID validation data, and no OOD split.

  On the ID validation examples where the spurious attribute disagrees with the label (the
  minority groups), keep each head (alone) that predicts the label more often than the
  attribute (a layer where none does keeps its best one). That combination is scored on
  those examples (`score_masks`) beside the full model and each head alone, and the best of
  them is chosen, so the rule never keeps a combination that does worse there than the
  model it started from.

  Args:
    full: the full model's metrics per split; `score_masks(masks) -> [scores]` on
      `roles.val_id`'s `conflict_accuracy`.
  """
  stats = [h["alone"][roles.val_id] for h in heads]
  if any("conflict_accuracy" not in s for s in stats):
    raise errors.UserError(f"Rule id_conflict needs a spurious attribute and conflicting examples "
                     f"on {roles.val_id!r}; this dataset has none. Use another --select.")
  combo, kept = np.array(full_mask, np.float32), {}
  for layer in sorted({h["layer"] for h in heads}):
    rows = [(h, st) for h, st in zip(heads, stats) if h["layer"] == layer]
    good = [h["head"] for h, st in rows
            if st["conflict_accuracy"] > st["conflict_spurious_accuracy"]]
    if not good:
      good = [max(rows, key=lambda r: r[1]["conflict_accuracy"])[0]["head"]]
    combo[layer] = 0.0
    combo[layer, good] = 1.0
    kept[layer] = good
  candidates = [("full", np.array(full_mask, np.float32),
                 _score(full[roles.val_id], "conflict_accuracy")),
                ("kept", combo, float(score_masks(combo[None])[0]))]
  candidates += [(f"layer {h['layer']} head {h['head']}",
                  _alone_mask(full_mask, h["layer"], h["head"]), st["conflict_accuracy"])
                 for h, st in zip(heads, stats)]
  name, mask, score = _best_candidate(candidates)
  return mask, {"kept": kept, "chosen": name, "score": score,
                "scores": {c[0]: c[2] for c in candidates}}


def select_id_val(heads: list[dict], roles: Roles, full_mask, full: dict
                  ) -> tuple[np.ndarray, dict]:
  """A rule that reads ID validation images and labels only: of the full model and each head
  alone, the one with the best ID validation accuracy ("training-domain validation",
  Gulrajani & Lopez-Paz 2021); it keeps a head only where that head does better in
  distribution than the whole model."""
  candidates = [("full", np.array(full_mask, np.float32), _score(full[roles.val_id],
                                                                  roles.id_metric))]
  candidates += [(f"layer {h['layer']} head {h['head']}",
                  _alone_mask(full_mask, h["layer"], h["head"]),
                  _score(h["alone"][roles.val_id], roles.id_metric)) for h in heads]
  name, mask, score = _best_candidate(candidates)
  return mask, {"chosen": name, "score": score}


def _select(rule: str, heads, roles, full_mask, layers, run_eval, full, *, k=None,
            topk_score="ood"):
  if rule == "oracle":
    return select_oracle(heads, roles, full_mask)
  if rule == "topk":
    return select_topk(heads, roles, full_mask, k=k, score=topk_score)
  if rule == "id_conflict":
    def conflict_scores(masks):
      results = run_eval(masks, [roles.val_id], desc="id_conflict")[roles.val_id]
      return np.array([_score(r, "conflict_accuracy") for r in results])
    return select_id_conflict(heads, roles, full_mask, full, conflict_scores)
  if rule == "id_val":
    return select_id_val(heads, roles, full_mask, full)
  if rule == "worst_group":  # group labels of the ID validation split, no OOD data
    return select_best_head(heads, roles.val_id, "worst_group_accuracy", full_mask)
  if rule == "greedy":
    def score_fn(masks):
      results = run_eval(masks, [roles.val_ood], desc="greedy")[roles.val_ood]
      return np.array([_score(r, roles.ood_metric) for r in results])
    # Start from the best of the full model and every head alone (so greedy >= oracle).
    oracle_mask, _ = select_oracle(heads, roles, full_mask)
    start = max([full_mask, oracle_mask], key=lambda m: score_fn(m[None])[0])
    mask, score, path = greedy_search(score_fn, start, layers)
    return mask, {"score": score, "path": [dict(mask=m.tolist(), score=s) for m, s in path]}
  checks.check_choice("selection rule", rule, RULES)
  raise AssertionError(rule)  # Unreachable: every rule is handled above.


def analyze(workdir: str, *, layer="-1", rule: str = "oracle", k: int | None = None,
            topk_score: str = "ood", step: int | None = None, progress: bool = True) -> dict:
  """Per-head evaluation of a run's checkpoint and a head selection (the `heads.json` dict).

  Args:
    workdir: a training run's workdir (`config.json` + checkpoints).
    layer: the layer(s) whose heads are evaluated and selected: -1 (last), 'all', '0,3'.
    rule: one of `RULES`; `k`, `topk_score` for `topk`.
    step: the checkpoint (default: newest).
  Returns:
    dict with `heads` (per head: `layer`, `head`, per split head-alone `accuracy` and
    `spurious_accuracy`, and the full metrics `alone` / `removed`), `full` and `selected`
    (per split metrics), `mask`, `rule`, `selection`, `roles`, and `epoch_oracle` when the run
    logged per-eval head figures (`config.head_eval`).
  """
  checks.check_choice("selection rule", rule, RULES)
  run = rundir.load_run(workdir, step)
  info = run.info
  depth, num_heads = masks_lib.model_shape(run.model)
  layers = masks_lib.parse_layers(layer, depth)
  splits = evaluate.eval_splits_of(run.config, info)
  roles = split_roles(splits, info.attributes)
  run_eval = evaluate.RunEval(run.model, run.variables, run.config, splits, layers=layers,
                              progress=progress)
  full_mask = np.ones((depth, num_heads), np.float32)
  alone, index = masks_lib.head_masks(depth, num_heads, layers, "alone")
  removed, _ = masks_lib.head_masks(depth, num_heads, layers, "removed")
  results = run_eval(np.concatenate([full_mask[None], alone, removed]), desc="heads")
  n = len(index)
  heads = [{"layer": l, "head": h,
            "accuracy": {s: results[s][1 + i]["accuracy"] for s in splits},
            "spurious_accuracy": {s: results[s][1 + i].get("spurious_accuracy")
                                  for s in splits},
            "alone": {s: results[s][1 + i] for s in splits},
            "removed": {s: results[s][1 + n + i] for s in splits}}
           for i, (l, h) in enumerate(index)]
  full = {s: results[s][0] for s in splits}
  mask, selection = _select(rule, heads, roles, full_mask, layers, run_eval, full, k=k,
                            topk_score=topk_score)
  selected = run_eval(mask[None], desc="selected")
  result = {
      "workdir": workdir if "://" in str(workdir) else os.path.abspath(workdir), "step": run.step, "dataset": run.config.data.name,
      "layers": list(layers), "rule": rule, "selection": selection,
      "roles": dataclasses.asdict(roles), "splits": list(splits),
      "full": full,
      "selected": {s: selected[s][0] for s in splits},
      "mask": mask.tolist(), "heads": heads,
      "compilations": run_eval.evaluator.traces,
  }
  records = summary.read_head_eval(workdir)
  if records:
    result["epoch_oracle"] = epoch_oracle(records, roles)
  return result


def epoch_oracle(records: list[dict], roles: Roles) -> dict:
  """The authors' choice (`summary.py`, rule `oracle`): the (step, head alone) with the best
  OOD validation score.

  Returns:
    `{"step", "layer", "head", "score", "metrics": {split: ...}, "full": {split: ...}}`, the
    chosen head's and the full model's metrics at that step on every logged split.
  """
  chosen = summary.summarize(records, roles, rules=("oracle",))["oracle"] if records else None
  if chosen is None:
    raise errors.UserError(f"No head-alone figures on {roles.val_ood!r} in {summary.HEAD_EVAL_FILE}.")
  full = {r["split"]: summary.strip(r) for r in records
          if r["step"] == chosen["step"] and r["kind"] == "full"}
  return {"step": chosen["step"], "layer": chosen["layer"], "head": chosen["head"],
          "score": chosen["score"], "metrics": chosen["metrics"], "full": full}
