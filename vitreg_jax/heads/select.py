"""Head selection: the rules, the analysis of one run, and the epoch oracle.

Selection rules (`RULES`; validation splits only, test figures are reported, never used):
`oracle` (the authors': the single head with the best OOD validation accuracy), `greedy`
(flip one head at a time while OOD validation accuracy improves), `topk` (the k best heads
by a per-head score) and `id_conflict`, which needs no OOD data: on the ID validation
examples where the spurious attribute disagrees with the label, keep the heads that follow
the label more often than the attribute; `worst_group` (the head with the best worst-group
accuracy on the ID validation split: its group labels, no OOD data) and `val_accuracy` (the
best plain ID validation accuracy: no group labels at all). Which split is ID and OOD:
`roles.split_roles`.

`analyze(workdir)` evaluates every head of a run's checkpoint (heads/evaluate.py), applies a
rule and returns the `heads.json` dict; `epoch_oracle` makes the authors' choice of epoch
and head from the per-eval figures a run logged (heads/training.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence

import numpy as np

from vitreg_jax import checks
from vitreg_jax import rundir
from vitreg_jax.heads import evaluate
from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.heads import training
from vitreg_jax.roles import Roles
from vitreg_jax.roles import split_roles

RULES = ("oracle", "greedy", "topk", "id_conflict", "worst_group", "val_accuracy")
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
    raise ValueError(f"No head has {metric!r} on split {split!r} (a dataset without groups "
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
    raise ValueError(f"--k must be in 1..{mask.shape[1]} (the heads per layer), got {k}.")
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


def select_id_conflict(heads: list[dict], roles: Roles, full_mask) -> tuple[np.ndarray, dict]:
  """A rule without OOD data: drop the heads that follow the spurious attribute.

  On the ID validation examples where the spurious attribute disagrees with the label, keep
  each head (alone) that predicts the label more often than the attribute; a layer where no
  head does keeps its single best head. Needs the attribute on ID data, no OOD split.
  """
  mask = np.array(full_mask, np.float32)
  kept = {}
  for layer in sorted({h["layer"] for h in heads}):
    rows = [h for h in heads if h["layer"] == layer]
    stats = [h["alone"][roles.val_id] for h in rows]
    if any("conflict_accuracy" not in s for s in stats):
      raise ValueError(f"Rule id_conflict needs a spurious attribute and conflicting examples "
                       f"on {roles.val_id!r}; this dataset has none. Use another --select.")
    good = [r["head"] for r, s in zip(rows, stats)
            if s["conflict_accuracy"] > s["conflict_spurious_accuracy"]]
    if not good:
      good = [rows[int(np.argmax([s["conflict_accuracy"] for s in stats]))]["head"]]
    mask[layer] = 0.0
    mask[layer, good] = 1.0
    kept[layer] = good
  return mask, {"kept": kept}


def _select(rule: str, heads, roles, full_mask, layers, run_eval, *, k=None,
            topk_score="ood"):
  if rule == "oracle":
    return select_oracle(heads, roles, full_mask)
  if rule == "topk":
    return select_topk(heads, roles, full_mask, k=k, score=topk_score)
  if rule == "id_conflict":
    return select_id_conflict(heads, roles, full_mask)
  if rule == "worst_group":  # group labels of the ID validation split, no OOD data
    return select_best_head(heads, roles.val_id, "worst_group_accuracy", full_mask)
  if rule == "val_accuracy":  # no group labels at all
    return select_best_head(heads, roles.val_id, roles.id_metric, full_mask)
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
  mask, selection = _select(rule, heads, roles, full_mask, layers, run_eval, k=k,
                            topk_score=topk_score)
  selected = run_eval(mask[None], desc="selected")
  result = {
      "workdir": workdir if "://" in str(workdir) else os.path.abspath(workdir), "step": run.step, "dataset": run.config.data.name,
      "layers": list(layers), "rule": rule, "selection": selection,
      "roles": dataclasses.asdict(roles), "splits": list(splits),
      "full": {s: results[s][0] for s in splits},
      "selected": {s: selected[s][0] for s in splits},
      "mask": mask.tolist(), "heads": heads,
      "compilations": run_eval.evaluator.traces,
  }
  records = training.read_head_eval(workdir)
  if records:
    result["epoch_oracle"] = epoch_oracle(records, roles)
  return result


def epoch_oracle(records: list[dict], roles: Roles) -> dict:
  """The authors' choice: the (step, head alone) with the best OOD validation score.

  Returns:
    `{"step", "layer", "head", "score", "metrics": {split: ...}, "full": {split: ...}}`, the
    chosen head's and the full model's metrics at that step on every logged split.
  """
  alone = [r for r in records if r["kind"] == "alone" and r["split"] == roles.val_ood]
  if not alone:
    raise ValueError(f"No head-alone figures on {roles.val_ood!r} in {training.HEAD_EVAL_FILE}.")
  best = max(alone, key=lambda r: (_score(r, roles.ood_metric), -r["step"]))
  strip = lambda r: {k: v for k, v in r.items()
                     if k not in ("step", "split", "kind", "layer", "head")}
  at_step = [r for r in records if r["step"] == best["step"]]
  return {"step": best["step"], "layer": best["layer"], "head": best["head"],
          "score": _score(best, roles.ood_metric),
          "metrics": {r["split"]: strip(r) for r in at_step if r["kind"] == "alone"
                      and (r["layer"], r["head"]) == (best["layer"], best["head"])},
          "full": {r["split"]: strip(r) for r in at_step if r["kind"] == "full"}}
