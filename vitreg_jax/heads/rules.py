"""Head selection rules: the one home of every rule, its meaning, its scores and its ties.

A rule chooses one candidate from a `Table`. A `Candidate` is the full model, one head alone
(the other heads of its layer masked, the layer rescaled) or a combination of heads, at one
evaluation step, with its metrics on every split (`metrics[split][name]`). Both places that
select use the same rules on the same kind of table:

* `heads --select=RULE` on one checkpoint (`select.analyze`): the table of the full model
  and every head alone of the evaluated layers at the checkpoint's step, with their masks;
  rules that build new masks (`greedy`, `topk`, `conflict_vote`) score them with
  `Context.score_masks`.
* `heads --table` and the report's poster table (`summary.summarize`): the table of the
  per-eval records of `heads_eval.jsonl`, every step a run logged. Nothing can score a new
  mask there, so a rule with `needs_score_masks` is refused with a `UserError`.

One score for a missing value (`value`): an absent, None or non-finite metric scores -inf
and is never chosen; a rule with nothing to choose returns None. One tie order (`tie_key`),
the head-diversity authors' (ArmandNM/diverse-vit, scripts/reporting.py,
`get_experiment_summary`: pandas `idxmax` and NumPy `argmax` keep the first maximum over
epochs x heads): the earliest step, the full model before heads, then layer, then head;
the first best candidate in that order wins (`Table.best`).

Rules register like regularizers: `register(Rule(name, reads, choose))` from any module,
then `--select=NAME` (one checkpoint) or `--select=NAME` with `--table` (per-eval records)
finds it by name (`get`). `reads` says what information the rule uses; the table's
"selection (reads)" column, docs/heads.md and `--help` print it. A record's every key is
in `Candidate.metrics[split]`, so a rule can read figures a later version logs per
evaluation (confidence statistics, agreement, per-example correctness) without a change here;
`Candidate.extra` and `Context.data` hold anything else a table builder attaches.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from vitreg_jax import errors
from vitreg_jax import registry
from vitreg_jax.heads import search
from vitreg_jax.roles import Roles

KINDS = ("full", "alone", "combination")  # Also the tie order of kinds at one step.
TOPK_SCORES = ("ood", "id_conflict")
_RECORD_KEY = ("step", "split", "kind", "layer", "head")


def value(metrics: Mapping[str, Any] | None, key: str) -> float:
  """The one score of a metric: its value, or -inf (never chosen) when it is missing, None or
  not finite."""
  v = None if metrics is None else metrics.get(key)
  return -math.inf if v is None or not math.isfinite(v) else float(v)


@dataclasses.dataclass(frozen=True, eq=False)
class Candidate:
  """One thing a rule can choose: a model (full, one head alone, or a combination of heads)
  at one evaluation step.

  Attributes:
    step: the evaluation (or checkpoint) step.
    kind: 'full', 'alone' or 'combination'.
    layer, head: the head of an 'alone' candidate (None otherwise).
    metrics: `{split: {metric: value}}`; per-eval records contribute every key they hold.
    mask: the `[depth, heads]` mask (checkpoint tables; None for per-eval records).
    description: a name for a combination (default: 'full' / 'layer L head H').
    extra: per-candidate data beyond the metrics a table builder attaches (e.g. the head
      removed's figures, `removed`).
  """
  step: int | None
  kind: str
  layer: int | None = None
  head: int | None = None
  metrics: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  mask: np.ndarray | None = None
  description: str = ""
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    if self.description:
      return self.description
    return "full" if self.kind == "full" else f"layer {self.layer} head {self.head}"

  def score(self, split: str, metric: str, *, lower_is_better: bool = False) -> float:
    """`metric` on `split` as a score (higher wins: negated when `lower_is_better`), with the
    one missing-value score (`value`): -inf either way."""
    v = value(self.metrics.get(split), metric)
    return -v if lower_is_better and v != -math.inf else v


def tie_key(c: Candidate) -> tuple:
  """The authors' tie order: earliest step, full model before heads, then layer, then head."""
  none_first = lambda x: -1 if x is None else x
  return (none_first(c.step), KINDS.index(c.kind), none_first(c.layer), none_first(c.head))


class Table:
  """Candidates in the tie order, and the first-best choice among them."""

  def __init__(self, candidates: Iterable[Candidate]):
    self.candidates = tuple(sorted(candidates, key=tie_key))

  @classmethod
  def from_records(cls, records: Sequence[dict]) -> "Table":
    """One candidate per logged (step, kind, layer, head) of `heads_eval.jsonl` lines, with
    the metrics of each split it was logged on (every key of the line but its own key)."""
    metrics = {}
    for r in records:
      key = (r["step"], r["kind"], r["layer"], r["head"])
      metrics.setdefault(key, {})[r["split"]] = {k: v for k, v in r.items()
                                                 if k not in _RECORD_KEY}
    return cls(Candidate(s, kind, layer, head, m) for (s, kind, layer, head), m in
               metrics.items())

  def __iter__(self):
    return iter(self.candidates)

  def __len__(self) -> int:
    return len(self.candidates)

  @property
  def steps(self) -> tuple:
    return tuple(sorted({c.step for c in self.candidates if c.step is not None}))

  def where(self, *, kinds: Sequence[str] | None = None, step: int | None = None,
            layer: int | None = None) -> "Table":
    """The candidates of these kinds, at this step, of this layer (None: any)."""
    return Table(c for c in self.candidates if (kinds is None or c.kind in kinds)
                 and (step is None or c.step == step) and (layer is None or c.layer == layer))

  def best(self, split: str, metric: str, *, lower_is_better: bool = False
           ) -> tuple[Candidate | None, float]:
    """The first candidate, in the tie order, with the best `metric` on `split` (the highest,
    or the lowest when `lower_is_better`), and that metric's value; `(None, -inf)` when no
    candidate has it."""
    chosen, best = None, -math.inf
    for c in self.candidates:
      score = c.score(split, metric, lower_is_better=lower_is_better)
      if score > best:
        chosen, best = c, score
    return chosen, (-best if lower_is_better and chosen is not None else best)


@dataclasses.dataclass(frozen=True)
class Choice:
  """A rule's choice: the candidate, its score and the rule's details (`heads.json`'s
  `selection`, JSON-serializable)."""
  candidate: Candidate
  score: float
  details: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
  """What a rule reads.

  Attributes:
    table: the candidates.
    roles: which split and metric are ID / OOD validation (`roles.split_roles`).
    options: the command's rule options (`k`, `topk_score`; None when unset).
    layers: the layers whose heads a rule may change (one checkpoint; () for records).
    score_masks: `(masks [M, depth, heads], split) -> [metrics of each mask]` on one
      checkpoint; None where nothing can evaluate a new mask (per-eval records).
    data: run-level data a table builder attaches for later rules.
  """
  table: Table
  roles: Roles
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  layers: tuple[int, ...] = ()
  score_masks: Callable[[np.ndarray, str], list[dict]] | None = None
  data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def scores(self, masks, split: str, metric: str) -> np.ndarray:
    """`[M]` scores of new masks (`score_masks`), with the one missing-value score."""
    return np.array([value(m, metric) for m in self.score_masks(np.asarray(masks), split)])

  def full(self) -> Candidate:
    """The full model at the table's last step (the start of a mask search)."""
    return self.table.where(kinds=("full",)).candidates[-1]


@dataclasses.dataclass(frozen=True)
class Rule:
  """A selection rule.

  Attributes:
    name: what `--select` names.
    reads: the information it uses, in words (the table's "selection (reads)" column).
    choose: `Context -> Choice`, or None when no candidate has what it reads.
    keeps: what it chooses, in one line (`--help`).
    needs_score_masks: it builds masks that are not candidates and needs
      `Context.score_masks` (one checkpoint; refused over per-eval records).
  """
  name: str
  reads: str
  choose: Callable[[Context], Choice | None]
  keeps: str = ""
  needs_score_masks: bool = False


REGISTRY = registry.Registry("selection rule", origin=lambda rule: rule.choose)


def register(rule: Rule, *, replace: bool = False) -> Rule:
  """Adds `rule` under `rule.name` (`replace=True` to redefine a name); returns it."""
  return REGISTRY.register(rule.name, rule, replace=replace)


def names(*, records: bool = False) -> tuple[str, ...]:
  """The registered rules, in registration order (`records=True`: those that run over
  per-eval records, i.e. need no `score_masks`)."""
  return tuple(n for n, r in REGISTRY.items() if not (records and r.needs_score_masks))


def get(name: str) -> Rule:
  if name not in REGISTRY:
    raise errors.UserError(f"Unknown selection rule {name!r}: --select must be one of the "
                           f"registered rules {list(REGISTRY)}.")
  return REGISTRY[name]


def check(name: str, *, can_score_masks: bool) -> Rule:
  """The rule `name`, if it can run: a `UserError` for an unknown rule, or for one that
  needs to score masks where nothing can (per-eval records: `can_score_masks=False`)."""
  rule = get(name)
  if rule.needs_score_masks and not can_score_masks:
    raise errors.UserError(
        f"Selection rule {name!r} builds head masks that must be evaluated on a checkpoint: "
        f"use `python -m vitreg_jax.heads --workdir=RUN --select={name}`; over per-eval "
        f"records (--table) the rules are {list(names(records=True))}.")
  return rule


def choose(name: str, context: Context) -> Choice | None:
  """Rule `name`'s choice on `context` (`check`ed first); None when no candidate has what
  it reads."""
  return check(name, can_score_masks=context.score_masks is not None).choose(context)


def describe() -> str:
  """One line per registered rule: its name, what it reads and what it keeps."""
  return "; ".join(f"{r.name} ({r.reads}{': ' + r.keeps if r.keeps else ''})"
                   for r in REGISTRY.values())


# --------------------------------------------------------------------------- built-in rules
def best_of(table: Table, split: str, metric: str, *, lower_is_better: bool = False
            ) -> Choice | None:
  """The first best candidate of `table` on `metric` of `split` (`Table.best`), with the
  details every single-candidate rule reports."""
  c, score = table.best(split, metric, lower_is_better=lower_is_better)
  if c is None:
    return None
  return Choice(c, score, {"chosen": c.name, "kind": c.kind, "step": c.step, "layer": c.layer,
                           "head": c.head, "score": score, "split": split, "metric": metric})


def _oracle(ctx: Context) -> Choice | None:
  return best_of(ctx.table.where(kinds=("alone",)), ctx.roles.val_ood, ctx.roles.ood_metric)


def _id_conflict(ctx: Context) -> Choice | None:
  return best_of(ctx.table.where(kinds=("full", "alone")), ctx.roles.val_id,
                 "conflict_accuracy")


def _id_val(ctx: Context) -> Choice | None:
  # Plain accuracy, not `roles.id_metric`: Waterbirds' ID figure weights the groups by the
  # training proportions, which needs the split's group labels; this rule reads none.
  return best_of(ctx.table.where(kinds=("full", "alone")), ctx.roles.val_id, "accuracy")


def _worst_group(ctx: Context) -> Choice | None:
  return best_of(ctx.table.where(kinds=("alone",)), ctx.roles.val_id, "worst_group_accuracy")


def _combination(ctx: Context, mask: np.ndarray, description: str) -> Candidate:
  return Candidate(ctx.full().step, "combination", mask=mask, description=description)


def _alone_heads(ctx: Context) -> dict[int, list[Candidate]]:
  """The heads alone at the last step, by layer."""
  step = ctx.full().step
  by_layer = {}
  for c in ctx.table.where(kinds=("alone",), step=step):
    by_layer.setdefault(c.layer, []).append(c)
  return by_layer


def _greedy(ctx: Context) -> Choice | None:
  """Starts from the better of the full model and the oracle head (so greedy >= oracle)."""
  split, metric = ctx.roles.val_ood, ctx.roles.ood_metric
  oracle = _oracle(ctx)
  if oracle is None:
    return None
  score_fn = lambda masks: ctx.scores(masks, split, metric)
  start = max([ctx.full().mask, oracle.candidate.mask], key=lambda m: score_fn(m[None])[0])
  mask, score, path = search.greedy_search(score_fn, start, ctx.layers)
  return Choice(_combination(ctx, mask, "greedy"), score,
                {"score": score, "path": [dict(mask=m.tolist(), score=s) for m, s in path]})


def _topk(ctx: Context) -> Choice | None:
  """In each layer the k heads with the best head-alone score (stable: lower head on ties)."""
  score = ctx.options.get("topk_score") or "ood"
  if score not in TOPK_SCORES:
    raise errors.UserError(f"Unknown --topk_score {score!r}: must be one of {TOPK_SCORES}.")
  split, metric = ((ctx.roles.val_ood, ctx.roles.ood_metric) if score == "ood"
                   else (ctx.roles.val_id, "conflict_accuracy"))
  mask = np.array(ctx.full().mask, np.float32)
  k = ctx.options.get("k") or math.ceil(mask.shape[1] / 2)
  if not 1 <= k <= mask.shape[1]:
    raise errors.UserError(f"--k must be in 1..{mask.shape[1]} (the heads per layer), got {k}.")
  kept = {}
  for layer, heads in sorted(_alone_heads(ctx).items()):
    order = np.argsort([-c.score(split, metric) for c in heads], kind="stable")[:k]
    kept[layer] = sorted(heads[i].head for i in order)
    mask[layer] = 0.0
    mask[layer, kept[layer]] = 1.0
  return Choice(_combination(ctx, mask, "topk"), math.nan,
                {"k": k, "score": score, "kept": kept})


def _conflict_vote(ctx: Context) -> Choice | None:
  """The heads that follow the label more often than the attribute on the conflicting ID
  validation examples (a layer where none does keeps its best one), if that combination
  beats the full model and each head alone there."""
  split, metric = ctx.roles.val_id, "conflict_accuracy"
  if all(c.score(split, metric) == -math.inf for c in ctx.table):
    return None  # No spurious attribute, or no conflicting example, on the split.
  mask, kept = np.array(ctx.full().mask, np.float32), {}
  for layer, heads in sorted(_alone_heads(ctx).items()):
    good = [c.head for c in heads
            if c.score(split, metric) > c.score(split, "conflict_spurious_accuracy")]
    kept[layer] = good or [max(heads, key=lambda c: c.score(split, metric)).head]
    mask[layer] = 0.0
    mask[layer, kept[layer]] = 1.0
  vote = Candidate(ctx.full().step, "combination", mask=mask, description="kept",
                   metrics={split: ctx.score_masks(mask[None], split)[0]})
  table = Table([*ctx.table.where(kinds=("full", "alone"), step=vote.step), vote])
  choice = best_of(table, split, metric)
  return dataclasses.replace(choice, details={
      **choice.details, "kept": kept, "scores": {c.name: c.score(split, metric) for c in table}})


for _rule in (
    Rule("oracle", "OOD validation labels", _oracle,
         "the head alone with the best OOD validation score (the authors' BEST HEAD; the "
         "ceiling)"),
    Rule("greedy", "OOD validation labels", _greedy,
         "from the better of the full model and the oracle head, flip one head at a time "
         "while the OOD validation score improves", needs_score_masks=True),
    Rule("topk", "OOD validation labels (--topk_score=ood) or ID validation attribute labels "
         "(id_conflict)", _topk, "the --k best heads alone of each layer",
         needs_score_masks=True),
    Rule("id_conflict", "ID validation attribute (group) labels", _id_conflict,
         "the full model or head alone with the best accuracy on the ID validation examples "
         "whose attribute disagrees with the label"),
    Rule("id_val", "ID validation labels only", _id_val,
         "the full model or head alone with the best ID validation accuracy"),
    Rule("worst_group", "ID validation group labels (worst_group_accuracy)", _worst_group,
         "the head alone with the best worst-group accuracy on the ID validation split"),
    Rule("conflict_vote", "ID validation attribute (group) labels", _conflict_vote,
         "the heads that follow the label more than the attribute on conflicting ID "
         "validation examples, if that beats the full model and each head alone there",
         needs_score_masks=True),
):
  register(_rule)
