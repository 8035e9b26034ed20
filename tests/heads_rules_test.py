"""The one home of head selection rules (heads/rules.py) on a hand-made table of candidates:
each rule's choice, the authors' tie order, the one missing-value score, the registry, and a
rule registered from outside the package used through `heads --table` on records."""

import json
import math
import os

import numpy as np
import pytest

from vitreg_jax import errors
from vitreg_jax.heads import __main__ as heads_main
from vitreg_jax.heads import rules
from vitreg_jax.heads import summary
from vitreg_jax.roles import split_roles

ROLES = split_roles(("val_id", "val_ood", "test_id", "test_ood"))


def m(acc_id=None, conflict=None, worst=None, ood=None, **more):
  """Per-split metrics of one candidate; a None figure is left out (missing)."""
  val_id = {k: v for k, v in (("accuracy", acc_id), ("conflict_accuracy", conflict),
                              ("worst_group_accuracy", worst)) if v is not None}
  return {"val_id": {**val_id, **more}, "val_ood": {} if ood is None else {"accuracy": ood}}


def table():
  """Two steps x (full + heads 0..2 of layer 3). Per rule, the intended winner and the ties
  it meets are in the comments."""
  c = rules.Candidate
  return rules.Table([
      # Given out of order: the table sorts them into the tie order.
      c(200, "alone", 3, 2, m(0.80, 0.50, 0.30, ood=0.75)),   # oracle ties step 100 head 1
      c(100, "alone", 3, 1, m(0.85, 0.60, 0.40, ood=0.75)),   # oracle: earliest step wins
      c(100, "full", None, None, m(0.90, 0.40, 0.20, ood=0.70)),  # id_val ties step 200 full
      c(100, "alone", 3, 0, m(0.70, 0.70, None, ood=0.60)),   # id_conflict ties full @200
      c(100, "alone", 3, 2, m(0.60, 0.10, 0.40, ood=float("nan"))),  # worst ties head 1
      c(200, "full", None, None, m(0.90, 0.70, 0.10, ood=0.72)),  # full before heads @200
      c(200, "alone", 3, 0, m(0.50, None, 0.10, ood=None)),
      c(200, "alone", 3, 1, m(0.88, 0.20, 0.20, ood=0.74)),
  ])


def chosen(rule, context):
  choice = rules.choose(rule, context)
  return choice.candidate.step, choice.candidate.kind, choice.candidate.head, choice.score


def test_the_table_is_in_the_authors_tie_order():
  keys = [(c.step, c.kind, c.layer, c.head) for c in table()]
  assert keys == [(100, "full", None, None), (100, "alone", 3, 0), (100, "alone", 3, 1),
                  (100, "alone", 3, 2), (200, "full", None, None), (200, "alone", 3, 0),
                  (200, "alone", 3, 1), (200, "alone", 3, 2)]
  combination = rules.Candidate(100, "combination", mask=np.ones((1, 1)))
  assert list(rules.Table([combination, *table()]))[4] is combination  # after the heads
  # At one step, a tie goes to the full model, then the lower layer, then the lower head.
  tie = lambda *c: chosen("id_val", rules.Context(rules.Table(c), ROLES))[1:3]
  c = rules.Candidate
  assert tie(c(1, "alone", 0, 0, m(0.9)), c(1, "full", metrics=m(0.9))) == ("full", None)
  assert tie(c(1, "alone", 1, 0, m(0.9)), c(1, "alone", 0, 3, m(0.9))) == ("alone", 3)


def test_each_rule_choice_and_the_first_best_in_tie_order():
  context = rules.Context(table(), ROLES)
  assert chosen("oracle", context) == (100, "alone", 1, 0.75)       # not step 200's 0.75
  assert chosen("id_conflict", context) == (100, "alone", 0, 0.70)  # not step 200's full
  assert chosen("id_val", context) == (100, "full", None, 0.90)     # heads only when better
  assert chosen("worst_group", context) == (100, "alone", 1, 0.40)  # head 1 before head 2
  details = rules.choose("oracle", context).details
  assert details == {"chosen": "layer 3 head 1", "kind": "alone", "step": 100, "layer": 3,
                     "head": 1, "score": 0.75, "split": "val_ood", "metric": "accuracy"}


def test_a_missing_value_scores_minus_infinity_and_is_never_chosen():
  assert rules.value({"a": None}, "a") == rules.value({}, "a") == -math.inf
  assert rules.value({"a": float("nan")}, "a") == rules.value(None, "a") == -math.inf
  assert rules.value({"a": 0.0}, "a") == 0.0
  # Only missing values: no choice (the table's row stays empty; --select names the fix).
  bare = rules.Table([rules.Candidate(1, "full", metrics=m(0.9)),
                      rules.Candidate(1, "alone", 0, 0, m(0.8, ood=float("nan")))])
  assert rules.choose("oracle", rules.Context(bare, ROLES)) is None
  assert rules.choose("id_conflict", rules.Context(bare, ROLES)) is None
  # Lower is better (a loss, a spurious accuracy): still -inf for a missing value.
  nll = rules.Table([rules.Candidate(1, "alone", 0, h, {"val_id": {"nll": v}})
                     for h, v in enumerate((None, 0.5, 0.2, float("inf"), 0.2))])
  c, score = nll.best("val_id", "nll", lower_is_better=True)
  assert (c.head, score) == (2, 0.2)
  # A missing value loses to any real one, however low.
  low = rules.Table([*bare, rules.Candidate(1, "alone", 0, 1, m(0.1, conflict=0.0))])
  assert chosen("id_conflict", rules.Context(low, ROLES))[2] == 1


def checkpoint_context(score_masks=None, **options):
  """One step, full + 4 heads of layer 1 (depth 2), with masks, as `heads --select` builds."""
  full = np.ones((2, 4), np.float32)
  out = [rules.Candidate(7, "full", metrics=m(0.9, 0.0, ood=0.6), mask=full)]
  for h, (ood, conflict) in enumerate(zip((0.6, 0.8, 0.7, 0.5), (0.3, 0.7, 0.6, 0.2))):
    mask = full.copy()
    mask[1] = np.eye(4)[h]
    out.append(rules.Candidate(7, "alone", 1, h, m(0.9, conflict, ood=ood,
                                                   conflict_spurious_accuracy=1 - conflict),
                               mask))
  return rules.Context(rules.Table(out), ROLES, options, (1,), score_masks)


def additive(weights, split="val_ood", metric="accuracy"):
  """`score_masks` whose `metric` is the sum of the kept heads' weights, on any split."""
  return lambda masks, s: [{metric: float((mk * weights).sum())} for mk in masks]


def test_rules_that_build_masks_score_them_and_refuse_records():
  weights = np.zeros((2, 4))
  weights[1] = [0.3, -0.2, 0.5, -0.1]
  greedy = rules.choose("greedy", checkpoint_context(additive(weights)))
  np.testing.assert_array_equal(greedy.candidate.mask[1], [1, 0, 1, 0])
  assert greedy.candidate.kind == "combination" and greedy.score == pytest.approx(0.8)
  topk = rules.choose("topk", checkpoint_context(additive(weights), k=2))
  np.testing.assert_array_equal(topk.candidate.mask[1], [0, 1, 1, 0])  # OOD 0.8, 0.7
  topk = rules.choose("topk", checkpoint_context(additive(weights), k=1,
                                                 topk_score="id_conflict"))
  np.testing.assert_array_equal(topk.candidate.mask[1], [0, 1, 0, 0])
  # conflict_vote: heads 1, 2 follow the label on conflicting examples; their combination
  # (scored 0.9 here) beats the full model and each head alone.
  vote = rules.choose("conflict_vote", checkpoint_context(
      lambda masks, s: [{"conflict_accuracy": 0.9}] * len(masks)))
  np.testing.assert_array_equal(vote.candidate.mask[1], [0, 1, 1, 0])
  assert vote.details["chosen"] == "kept" and vote.details["scores"]["full"] == 0.0
  for rule in ("greedy", "topk", "conflict_vote"):
    with pytest.raises(errors.UserError, match=f"{rule}.*--workdir=RUN"):
      rules.choose(rule, rules.Context(table(), ROLES))
  with pytest.raises(errors.UserError, match="--k must be in 1..4"):
    rules.choose("topk", checkpoint_context(additive(weights), k=5))


def test_registry_names_the_valid_rules():
  assert {"oracle", "greedy", "topk", "id_conflict", "id_val", "worst_group"} <= \
      set(rules.names())
  assert "greedy" not in rules.names(records=True)
  with pytest.raises(errors.UserError, match=r"'nope'.*registered rules \['oracle'"):
    rules.get("nope")
  with pytest.raises(errors.UserError, match="already registered"):
    rules.register(rules.Rule("oracle", "anything", _most_confident))
  assert "id_val (ID validation labels only" in rules.describe()


# A rule from outside the package: the head alone with the best ID validation accuracy among
# those whose OOD validation accuracy (the records' extra figure) it never reads.
def _most_confident(context):
  heads = context.table.where(kinds=("alone",))
  return rules.best_of(heads, context.roles.val_id, "mean_confidence")


def write_run(root):
  """A run directory with a config and per-eval records (2 steps, full + 2 heads)."""
  os.makedirs(root)
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump({"model_name": "vit", "seed": 0, "data": {
        "name": "dominoes", "eval_splits": ["val_id", "val_ood", "test_id", "test_ood"]}}, f)
  with open(os.path.join(root, summary.HEAD_EVAL_FILE), "w") as f:
    for step in (10, 20):
      for kind, head in (("full", None), ("alone", 0), ("alone", 1)):
        for split in ("val_id", "val_ood", "test_id", "test_ood"):
          acc = 0.5 + 0.1 * (head or 0) + step / 1000
          conf = 0.9 if (step, head) == (10, 0) else 0.6  # the outside rule's choice
          f.write(json.dumps({"step": step, "split": split, "kind": kind,
                              "layer": None if head is None else 2, "head": head,
                              "accuracy": acc, "mean_confidence": conf}) + "\n")
  return root


def test_a_rule_registered_outside_the_package_runs_in_heads_table(tmp_path, capsys):
  rules.register(rules.Rule("most_confident", "ID validation images only (confidence)",
                            _most_confident), replace=True)
  run = write_run(str(tmp_path / "run"))
  assert heads_main.main(["--table", run, "--select=most_confident,oracle"]) == 0
  out = capsys.readouterr().out
  row = next(l for l in out.splitlines() if "most_confident" in l)
  # Step 10, head 0: test_id / test_ood accuracy 0.51 -> 51.00; its chosen step 10.
  assert "most_confident: ID validation images only (confidence)" in row
  assert "| 51.00 |" in row and row.rstrip().endswith("| 10 |")
  assert out.index("most_confident") < out.index("oracle:")  # rows in --select's order
  # Through Python too, beside the built-in rules.
  got = summary.summarize(summary.read_head_eval(run), ROLES, rules=("most_confident",))
  assert (got["most_confident"]["step"], got["most_confident"]["head"]) == (10, 0)


def test_heads_table_refuses_a_rule_that_needs_a_checkpoint(tmp_path, capsys):
  run = write_run(str(tmp_path / "run"))
  with pytest.raises(SystemExit):
    heads_main.main(["--table", run, "--select=greedy"])
  assert "--workdir=RUN --select=greedy" in capsys.readouterr().err
  with pytest.raises(SystemExit) as exit_info:
    heads_main.main(["--workdir", run, "--select=nope"])  # before any checkpoint is read
  assert exit_info.value.code == errors.EXIT_STATUS
  assert "Unknown selection rule 'nope'" in capsys.readouterr().err
