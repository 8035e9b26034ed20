"""Head selection on one checkpoint (`analyze`), and the epoch oracle of per-eval figures.

`analyze(workdir)` evaluates the full model, every head alone and every head removed of the
evaluated layers of a run's checkpoint (heads/evaluate.py), builds the table of candidates
(`candidate_table`: the full model and each head alone, with their masks) and applies a
selection rule of heads/rules.py, the one home of the rules (their meanings, the missing-value
score and the tie order), giving it the evaluator (`score_masks`) for the rules that build
new masks; it returns the `heads.json` dict. Selection reads validation splits only; test
figures are reported, never used. Which split is ID and OOD: `roles.split_roles`.

`epoch_oracle` makes the authors' choice of epoch and head from the per-eval figures a run
logged (heads/summary.py has the statistics).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from vitreg_jax import errors
from vitreg_jax.heads import evaluate
from vitreg_jax.heads import examples as examples_lib
from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.heads import rules
from vitreg_jax.heads import summary
from vitreg_jax.roles import Roles
from vitreg_jax.roles import split_roles
from vitreg_jax.training import rundir


def candidate_table(heads: Sequence[dict], full: dict, full_mask, step: int | None = None
                    ) -> rules.Table:
  """The candidates of one checkpoint: the full model (metrics `full`) and each head alone
  (`heads[i]["alone"]`; `heads[i]["removed"]`, where present, in `extra`), with their masks."""
  full_mask = np.asarray(full_mask, np.float32)
  out = [rules.Candidate(step, "full", metrics=full, mask=full_mask)]
  for h in heads:
    mask = full_mask.copy()
    mask[h["layer"]] = 0.0
    mask[h["layer"], h["head"]] = 1.0
    out.append(rules.Candidate(step, "alone", h["layer"], h["head"], h["alone"], mask,
                               extra={"removed": h.get("removed", {})}))
  return rules.Table(out)


def select(rule: str, heads: Sequence[dict], roles: Roles, full_mask, full: dict, *,
           layers: Sequence[int] = (), score_masks: Callable | None = None,
           step: int | None = None, examples: dict | None = None,
           **options) -> tuple[np.ndarray, dict]:
  """Rule `rule` on one checkpoint's figures: `(mask [depth, heads], selection details)`.

  Args:
    heads: per head `layer`, `head` and per-split metrics `alone` (`analyze`'s `heads`).
    full: the full model's metrics per split.
    layers: the layers a mask search may change; `score_masks(masks, split) -> [metrics]`
      scores new masks (rules with `needs_score_masks` refuse to run without it).
    examples: the per-example validation outputs of the full model and each head alone
      (`{"keys", split: {...}}`, heads/examples.py), what the label-free rules read.
    options: the rule options (`k`, `topk_score`, `ood_labels`, `ood_draw`).
  Raises:
    UserError: an unknown rule, or one that finds nothing it reads on these figures.
  """
  context = rules.Context(candidate_table(heads, full, full_mask, step), roles, options,
                          tuple(layers), score_masks,
                          {"examples": {step: examples} if examples else {}})
  choice = rules.choose(rule, context)
  if choice is None:
    rule_obj = rules.get(rule)
    raise errors.UserError(
        f"Selection rule {rule!r} reads {rule_obj.reads}, which this run's figures lack (a "
        "dataset without groups has no worst_group_accuracy, one without a spurious "
        "attribute no conflict_accuracy, one whose ID and OOD validation roles are one split "
        "no separate OOD inputs): use another --select.")
  return np.asarray(choice.candidate.mask, np.float32), dict(choice.details)


def analyze(workdir: str, *, layer="-1", rule: str = "oracle", k: int | None = None,
            topk_score: str = "ood", step: int | None = None, progress: bool = True,
            ood_labels: int | None = None, ood_draw: int = 0) -> dict:
  """Per-head evaluation of a run's checkpoint and a head selection (the `heads.json` dict).

  Args:
    workdir: a training run's workdir (`config.json` + checkpoints).
    layer: the layer(s) whose heads are evaluated and selected: -1 (last), 'all', '0,3'.
    rule: a registered rule (`rules.names()`); options: `k`, `topk_score`, `ood_labels`, `ood_draw`.
    step: the checkpoint (default: newest).
  Returns:
    dict with `heads` (per head: `layer`, `head`, per split head-alone `accuracy` and
    `spurious_accuracy`, and the full metrics `alone` / `removed`), `full` and `selected`
    (per split metrics), `mask`, `rule`, `selection`, `roles`, and `epoch_oracle` when the run
    logged per-eval head figures (`config.head_eval`).
  """
  rules.get(rule)  # An unknown rule fails before the checkpoint is read.
  run = rundir.load_run(workdir, step)
  dataset = run.dataset
  depth, num_heads = masks_lib.model_shape(run.model)
  layers = masks_lib.parse_layers(layer, depth)
  splits = dataset.held_out_splits
  roles = split_roles(splits, dataset.info.attributes)
  val_splits = tuple(dict.fromkeys((roles.val_id, roles.val_ood)))  # One on Waterbirds.
  run_eval = evaluate.RunEval(run.model, run.variables, run.config, dataset, splits,
                              layers=layers, progress=progress, keep_examples=val_splits)
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
  def score_masks(masks, split):
    return run_eval(masks, [split], desc=rule)[split]
  mask, selection = select(
      rule, heads, roles, full_mask, full, layers=layers, score_masks=score_masks,
      step=run.step, examples=candidate_examples(run_eval, full_mask, alone, index, val_splits),
      k=k, topk_score=topk_score, ood_labels=ood_labels, ood_draw=ood_draw)
  selected = run_eval(mask[None], desc="selected")
  result = {
      "workdir": workdir if "://" in str(workdir) else os.path.abspath(workdir),
      "step": run.step, "dataset": run.config.data.name,
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


def candidate_examples(run_eval, full_mask, alone, index, splits) -> dict:
  """The full model's and each head alone's per-example outputs on `splits` (already scored
  by `run_eval`), as the label-free rules read them over the logs: through heads/examples.py's
  `pack` / `unpack` (float16 confidences), so one rule means the same on a checkpoint."""
  masks = np.concatenate([full_mask[None], alone])
  return examples_lib.unpack(examples_lib.pack(
      [("full", None, None)] + [("alone", l, h) for l, h in index],
      {s: run_eval.examples(masks, s) for s in splits}))


def epoch_oracle(records: list[dict], roles: Roles) -> dict:
  """The authors' choice (`summary.py`, rule `oracle`): the (step, head alone) with the best
  OOD validation score.

  Returns:
    `{"step", "layer", "head", "score", "metrics": {split: ...}, "full": {split: ...}}`, the
    chosen head's and the full model's metrics at that step on every logged split.
  """
  chosen = summary.summarize(records, roles, rules=("oracle",))["oracle"] if records else None
  if chosen is None:
    raise errors.UserError(f"No head-alone figures on {roles.val_ood!r} in "
                           f"{summary.HEAD_EVAL_FILE}.")
  full = {r["split"]: summary.strip(r) for r in records
          if r["step"] == chosen["step"] and r["kind"] == "full"}
  return {"step": chosen["step"], "layer": chosen["layer"], "head": chosen["head"],
          "score": chosen["score"], "metrics": chosen["metrics"], "full": full}
