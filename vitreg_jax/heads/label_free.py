"""Head selection with less OOD information (issue 27): rules in three tiers, named by what
they read, registered in heads/rules.py's registry (the estimators: heads/estimators.py).

They read the per-example outputs of the validation splits (heads/examples.py:
`Context.data["examples"]`, `{step: {"keys", split: {pred, confidence, label, ...}}}`), which
`heads --select` computes on its checkpoint and training writes at every evaluation
(`heads_examples/`); over records without them (older runs) they choose nothing (an empty
row) and `heads --select` says what they lack. Each chooses among the full model and every
head alone (the k-label rule: heads alone, as the oracle) at every evaluation step a table
holds, and the first best in the authors' tie order wins (`rules.tie_key`):

1. ID validation labels only (no OOD data, no groups): `id_errors`, `id_low_confidence`.
   The reference model is the full model at the step with the best ID validation accuracy
   (the model one would keep with ID labels only); its errors (JTT's error set) or its least
   confident examples, as many as its errors (AFR's premise), form a pseudo-minority group,
   and every (step, candidate) is scored by its mean accuracy over that group and the rest
   of the ID validation split (`estimators.pseudo_group_accuracy`), the best chosen.
2. Unlabeled OOD inputs (OOD validation images, never their labels), besides ID validation
   labels: `atc`, `doc`, `aline` estimate each (step, candidate)'s OOD accuracy and choose
   the best estimate over steps x candidates (the authors' statistic, the estimate in place
   of the OOD validation accuracy); `aline` fits its line on the pairs of candidates of each
   step. `disagreement` (DivDis's disambiguation without labels) keeps the step of tier 1's
   reference (the best full model on ID validation accuracy) and there chooses the head alone
   whose disagreement with the full model grows most from ID to OOD inputs
   (`estimators.disagreement_gap`): DivDis's heads fit the source data and differ on the
   target; the full model, which has learned the shortcut (the poster's starting point),
   stands in for the shortcut head, and a head that agrees with it on ID inputs but not on
   OOD ones reads another feature. Where the ID and OOD validation roles are one split
   (Waterbirds' layout) there are no separate OOD inputs: these rules choose nothing.
3. k OOD validation labels: `ood_k`, the oracle on a random draw of k labelled OOD validation
   examples (`--ood_labels`, default 16; draw seed `--ood_draw`, default 0): all of them give
   the oracle. `ood_k_atc` (estimate, then confirm) breaks the ties among the heads best on
   the k labels by their ATC estimate (it reads the unlabeled OOD inputs too). The k-label
   curve (heads/k_labels.py) averages both over draws.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from vitreg_jax import errors
from vitreg_jax.heads import estimators
from vitreg_jax.heads import rules

CANDIDATES = ("full", "alone")
DEFAULT_OOD_LABELS = 16


class Step:
  """One step's candidates (full model, heads alone) that have per-example outputs.

  Attributes:
    step: the step; candidates: `rules.Candidate`s in the file's order; data: `{split:
      arrays}` with `pred` / `confidence` restricted to those candidates' rows.
  """

  def __init__(self, step, candidates, data):
    self.step, self.candidates, self.data = step, candidates, data

  def correct(self, split: str) -> np.ndarray:
    return self.data[split]["pred"] == self.data[split]["label"][None]

  def accuracy(self, split: str) -> np.ndarray:
    return self.correct(split).mean(axis=1)

  def full_row(self) -> int | None:
    return next((i for i, c in enumerate(self.candidates) if c.kind == "full"), None)


def steps(ctx: rules.Context, kinds: Sequence[str] = CANDIDATES) -> list[Step]:
  """The table's steps with per-example outputs (`Context.data["examples"]`) on the
  validation splits, each with its candidates of `kinds`."""
  examples = ctx.data.get("examples") or {}
  splits = (ctx.roles.val_id, ctx.roles.val_ood)
  out = []
  for step in sorted({c.step for c in ctx.table}, key=lambda s: -1 if s is None else s):
    ex = examples.get(step)
    if ex is None or not all(s in ex for s in splits):
      continue
    by_key = {(c.kind, c.layer, c.head): c for c in ctx.table.where(kinds=kinds, step=step)}
    rows = [i for i, k in enumerate(ex["keys"]) if tuple(k) in by_key]
    if not rows:
      continue
    data = {s: {**ex[s], "pred": ex[s]["pred"][rows], "confidence": ex[s]["confidence"][rows]}
            for s in splits}
    out.append(Step(step, [by_key[tuple(ex["keys"][i])] for i in rows], data))
  return out


def best(scored, name: str, **details) -> rules.Choice | None:
  """The first (tie order) of `(candidate, score)` pairs with the highest finite score."""
  chosen, top = None, -math.inf
  for c, score in sorted(scored, key=lambda cs: rules.tie_key(cs[0])):
    score = -math.inf if score is None or not math.isfinite(score) else float(score)
    if score > top:
      chosen, top = c, score
  if chosen is None:
    return None
  return rules.Choice(chosen, top, {"chosen": chosen.name, "kind": chosen.kind,
                                    "step": chosen.step, "layer": chosen.layer,
                                    "head": chosen.head, "score": top, "estimate": name,
                                    **details})


def reference(ctx: rules.Context, all_steps: list[Step]) -> tuple[Step, int] | None:
  """Tier 1's reference model: the full model at the step with the best ID validation
  accuracy (first in step order), as `(its Step, its row)`."""
  found, top = None, -math.inf
  for st in all_steps:
    row = st.full_row()
    if row is not None and st.accuracy(ctx.roles.val_id)[row] > top:
      found, top = (st, row), st.accuracy(ctx.roles.val_id)[row]
  return found


def _pseudo_group_rule(make_set: Callable[[np.ndarray, np.ndarray], np.ndarray], name: str):
  def choose(ctx: rules.Context) -> rules.Choice | None:
    all_steps = steps(ctx)
    ref = reference(ctx, all_steps)
    if ref is None:
      return None
    st, row = ref
    split = ctx.roles.val_id
    in_set = make_set(st.data[split]["confidence"][row], st.correct(split)[row])
    scored = [(c, s) for x in all_steps
              for c, s in zip(x.candidates, estimators.pseudo_group_accuracy(x.correct(split),
                                                                             in_set))]
    return best(scored, name, reference_step=st.step, pseudo_group_size=int(in_set.sum()))
  return choose


def _separate_ood(ctx: rules.Context) -> bool:
  return ctx.roles.val_ood != ctx.roles.val_id


def _atc(ctx: rules.Context) -> rules.Choice | None:
  if not _separate_ood(ctx):
    return None
  i, o = ctx.roles.val_id, ctx.roles.val_ood
  scored = [(c, estimators.atc(st.data[i]["confidence"][r], st.correct(i)[r],
                               st.data[o]["confidence"][r]))
            for st in steps(ctx) for r, c in enumerate(st.candidates)]
  return best(scored, "atc")


def _doc(ctx: rules.Context) -> rules.Choice | None:
  """From the records' `accuracy` and `mean_confidence` (no per-example outputs needed)."""
  if not _separate_ood(ctx):
    return None
  i, o = ctx.roles.val_id, ctx.roles.val_ood
  get = lambda c, split, key: (c.metrics.get(split) or {}).get(key)
  scored = []
  for c in ctx.table.where(kinds=CANDIDATES):
    figures = (get(c, i, "accuracy"), get(c, i, "mean_confidence"),
               get(c, o, "mean_confidence"))
    scored.append((c, None if None in figures else float(estimators.doc(*figures))))
  return best(scored, "doc")


def _aline(ctx: rules.Context) -> rules.Choice | None:
  if not _separate_ood(ctx):
    return None
  i, o = ctx.roles.val_id, ctx.roles.val_ood
  scored = []
  for st in steps(ctx):
    estimate = estimators.aline_s(st.accuracy(i), st.data[i]["pred"], st.data[o]["pred"])
    scored += list(zip(st.candidates, estimate))
  return best(scored, "aline")


def _disagreement(ctx: rules.Context) -> rules.Choice | None:
  if not _separate_ood(ctx):
    return None
  ref = reference(ctx, steps(ctx))
  if ref is None:
    return None
  st, row = ref
  i, o = ctx.roles.val_id, ctx.roles.val_ood
  gap = estimators.disagreement_gap(st.data[i]["pred"], st.data[i]["pred"][row],
                                    st.data[o]["pred"], st.data[o]["pred"][row])
  return best(list(zip(st.candidates, gap)), "disagreement", reference_step=st.step)


def ood_split_groups(ctx: rules.Context, data: dict) -> np.ndarray | None:
  """The group labels the OOD metric averages over (`mean_group_accuracy`), else None."""
  return data.get("group") if ctx.roles.ood_metric == "mean_group_accuracy" else None


class KLabelCandidates:
  """The k-label rules' candidates: every step's heads alone (the oracle's), in the tie
  order, with what choosing on k labels reads.

  Attributes:
    candidates: `rules.Candidate`s; correct: `[C, n]` bool on the OOD validation split;
    groups: `[n]` group labels where the OOD metric averages over groups, else None;
    atc: `[C]` ATC estimates (the tie-break of `ood_k_atc`; nan without separate OOD inputs).
  """

  def __init__(self, ctx: rules.Context, all_steps: list[Step]):
    o, i = ctx.roles.val_ood, ctx.roles.val_id
    rows = sorted(((st, r, c) for st in all_steps for r, c in enumerate(st.candidates)),
                  key=lambda t: rules.tie_key(t[2]))
    self.candidates = [c for _, _, c in rows]
    self.correct = np.stack([st.correct(o)[r] for st, r, _ in rows])
    self.groups = ood_split_groups(ctx, all_steps[0].data[o])
    self.atc = np.array([estimators.atc(st.data[i]["confidence"][r], st.correct(i)[r],
                                        st.data[o]["confidence"][r])
                         if _separate_ood(ctx) else np.nan for st, r, _ in rows])

  @classmethod
  def of(cls, ctx: rules.Context) -> "KLabelCandidates | None":
    all_steps = steps(ctx, kinds=("alone",))
    return cls(ctx, all_steps) if all_steps else None

  @property
  def num_examples(self) -> int:
    return self.correct.shape[1]

  def choose(self, weights, confirm: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(chosen row [D], its score [D])` per draw (`weights` `[n, D]`,
    `estimators.draw_weights`): the first best on the drawn labels, ties broken by the ATC
    estimate when `confirm`."""
    scores = estimators.subset_scores(self.correct, weights, self.groups)
    chosen = estimators.first_best(scores, self.atc if confirm else None)
    return chosen, scores[chosen, np.arange(scores.shape[1])]


def ood_labels(ctx: rules.Context) -> int:
  k = int(ctx.options.get("ood_labels") or DEFAULT_OOD_LABELS)
  if k < 1:
    raise errors.UserError(f"--ood_labels must be at least 1 (the labelled OOD validation "
                           f"examples the k-label rules read), got {k}.")
  return k


def _k_label_rule(confirm: bool):
  def choose(ctx: rules.Context) -> rules.Choice | None:
    found = KLabelCandidates.of(ctx)
    if found is None:
      return None
    k, seed = ood_labels(ctx), int(ctx.options.get("ood_draw") or 0)
    weights = estimators.draw_weights(found.num_examples, k, 1, seed)
    (row,), (score,) = found.choose(weights, confirm)
    if row < 0:
      return None
    c = found.candidates[row]
    return best([(c, score)], "ood_k_atc" if confirm else "ood_k",
                ood_labels=min(k, found.num_examples), ood_draw=seed)
  return choose


for _rule in (
    rules.Rule("id_errors", "ID validation labels only", _pseudo_group_rule(
        lambda conf, correct: ~np.asarray(correct, bool), "id_errors"),
        "the full model or head alone with the best mean accuracy over the ID validation "
        "examples the reference full model gets wrong and the rest (JTT's error set)"),
    rules.Rule("id_low_confidence", "ID validation labels only", _pseudo_group_rule(
        estimators.low_confidence_set, "id_low_confidence"),
        "as id_errors, the pseudo-group being the reference's least confident ID validation "
        "examples, as many as its errors (AFR)"),
    rules.Rule("atc", "unlabeled OOD inputs (and ID validation labels)", _atc,
               "the best Average Thresholded Confidence estimate of OOD accuracy (Garg et "
               "al. 2022)"),
    rules.Rule("doc", "unlabeled OOD inputs (and ID validation labels)", _doc,
               "the best Difference-of-Confidences estimate of OOD accuracy (Guillory et al. "
               "2021)"),
    rules.Rule("aline", "unlabeled OOD inputs (and ID validation labels)", _aline,
               "the best agreement-on-the-line (ALine-S) estimate of OOD accuracy, fit on "
               "each step's candidates (Baek et al. 2022)"),
    rules.Rule("disagreement", "unlabeled OOD inputs (and ID validation labels)",
               _disagreement,
               "at the step of the best full model on ID validation, the head alone whose "
               "disagreement with the full model grows most from ID to OOD inputs (DivDis)"),
    rules.Rule("ood_k", "k OOD labels (--ood_labels=K, default 16, one random draw)",
               _k_label_rule(False),
               "the head alone with the best OOD validation score on k random labelled "
               "examples (the oracle on k labels)"),
    rules.Rule("ood_k_atc", "k OOD labels (--ood_labels=K, one random draw) and unlabeled OOD "
               "inputs", _k_label_rule(True),
               "as ood_k, the heads tied on the k labels compared on their ATC estimate "
               "(estimate, then confirm)"),
):
  rules.register(_rule)
