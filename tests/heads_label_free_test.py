"""The label-free selection rules (heads/label_free.py) end to end on tiny runs, the k-label
curve (heads/k_labels.py) and `heads --table`'s gain-recovered table (selection_table.py)."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from vitreg_jax.heads import __main__ as heads_main
from vitreg_jax.heads import estimators
from vitreg_jax.heads import examples as examples_lib
from vitreg_jax.heads import k_labels
from vitreg_jax.heads import label_free
from vitreg_jax.heads import rules
from vitreg_jax.heads import select as select_lib
from vitreg_jax.heads import selection_table
from vitreg_jax.heads import summary
from vitreg_jax.roles import split_roles

import testutil

NEW_RULES = ("id_errors", "id_low_confidence", "atc", "doc", "aline", "disagreement", "ood_k",
             "ood_k_atc")
ROLES = split_roles(["val_id", "val_ood", "test_id", "test_ood"])


def _config(seed):
  config = testutil.load_config_module("quickstart").get_config("runlocal")
  config.model.update(width=16, depth=2, mlp_dim=32, num_heads=2)
  config.data.update(num_train=128, num_val=60, num_test=40)
  config.update(dict(batch_size=32, eval_batch_size=64, total_steps=4, eval_every_steps=2,
                     checkpoint_every_steps=4, log_every_steps=2, head_eval="all", seed=seed))
  config.schedule.warmup_steps = 1
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from vitreg_jax.training import train  # pylint: disable=g-import-not-at-top
  out = []
  for seed in (0, 1):
    workdir = str(tmp_path_factory.mktemp(f"run{seed}"))
    train.train_and_evaluate(_config(seed), workdir)
    out.append(workdir)
  return out


def test_every_rule_tells_what_it_reads():
  for name in NEW_RULES:
    assert name in rules.names(records=True) and rules.get(name).reads
  assert "unlabeled OOD inputs" in rules.get("atc").reads
  assert "k OOD labels" in rules.get("ood_k").reads
  assert rules.get("id_errors").reads == "ID validation labels only"


def _slow_atc_choice(records, examples):
  """ATC's (step, kind, layer, head) choice with loops over the files (the reference)."""
  best, top = None, -math.inf
  for step in sorted(examples):
    ex = examples[step]
    for row, key in enumerate(ex["keys"]):
      correct = ex["val_id"]["pred"][row] == ex["val_id"]["label"]
      est = estimators.atc(ex["val_id"]["confidence"][row], correct,
                           ex["val_ood"]["confidence"][row])
      if est > top:  # Steps ascending, full before heads, then layer and head: tie order.
        best, top = (step, *key), est
  return best, top


def test_each_rule_chooses_over_the_logs_of_a_tiny_run(runs):
  records = summary.read_head_eval(runs[0])
  got = summary.summarize(records, ROLES, ("oracle", *NEW_RULES), workdir=runs[0])
  for name in NEW_RULES:
    assert got[name] is not None, name
    assert got[name]["step"] in (2, 4) and got[name]["kind"] in ("full", "alone")
  examples = examples_lib.read(runs[0])
  want, score = _slow_atc_choice(records, examples)
  assert (got["atc"]["step"], got["atc"]["kind"], got["atc"]["layer"],
          got["atc"]["head"]) == want and got["atc"]["score"] == pytest.approx(score)
  # All the OOD validation labels: ood_k is the oracle.
  table = rules.Table.from_records(records)
  ctx = rules.Context(table, ROLES, {"ood_labels": 10**6}, data={"examples": examples})
  all_labels = rules.choose("ood_k", ctx)
  oracle = got["oracle"]
  assert (all_labels.candidate.step, all_labels.candidate.layer, all_labels.candidate.head) \
      == (oracle["step"], oracle["layer"], oracle["head"])
  assert all_labels.score == pytest.approx(oracle["score"])
  # Without the files (an older run) the rules that read them choose nothing; doc reads
  # the records' mean confidences only.
  bare = summary.summarize(records, ROLES, NEW_RULES)
  assert bare["doc"] == got["doc"]
  assert all(bare[n] is None for n in NEW_RULES if n != "doc")
  # Estimate, then confirm: on k labels ood_k_atc keeps a head tied best with ood_k's.
  ctx4 = rules.Context(table, ROLES, {"ood_labels": 4}, data={"examples": examples})
  plain, confirmed = rules.choose("ood_k", ctx4), rules.choose("ood_k_atc", ctx4)
  assert confirmed.score == plain.score


@pytest.mark.parametrize("rule", NEW_RULES)
def test_select_on_the_checkpoint_equals_the_table_at_the_last_evaluation(runs, rule):
  """One meaning per rule: on the final checkpoint (the last evaluation's weights),
  `heads --select=RULE` chooses what the table's row chooses over that evaluation alone."""
  result = select_lib.analyze(runs[0], layer="all", rule=rule, progress=False)
  row = summary.summarize(summary.read_head_eval(runs[0]), ROLES, (rule,), "final",
                          workdir=runs[0])[rule]
  selection = result["selection"]
  assert (selection["kind"], selection["layer"], selection["head"]) == \
      (row["kind"], row["layer"], row["head"])
  assert selection["score"] == pytest.approx(row["score"], abs=1e-6)


def test_a_rule_without_separate_ood_inputs_chooses_nothing(runs):
  grouped = split_roles(["val", "test"], ["group"])
  records = [dict(r, split={"val_id": "val", "test_id": "test"}[r["split"]])
             for r in summary.read_head_eval(runs[0]) if r["split"] in ("val_id", "test_id")]
  ctx = rules.Context(rules.Table.from_records(records), grouped, data={"examples": {}})
  for name in ("atc", "doc", "aline", "disagreement"):
    assert rules.choose(name, ctx) is None


def test_k_label_curve_ends_at_the_oracle(runs):
  records = summary.read_head_eval(runs[0])
  curve = k_labels.run_curve(records, ROLES, examples_lib.Lazy(runs[0]), draws=20)
  assert curve["k"] == [4, 8, 16, 32, 60] and curve["num_ood_val"] == 60
  oracle = summary.summarize(records, ROLES, ("oracle",))["oracle"]
  assert curve["ood"][-1] == pytest.approx(100 * oracle["metrics"]["test_ood"]["accuracy"])
  assert all(0 <= v <= 100 for v in curve["ood"])
  # k = 4 against loops: per draw, the first (step, head alone) in the tie order with the
  # most correct drawn examples, and the mean of its OOD test accuracy.
  examples = examples_lib.read(runs[0])
  test = {(r["step"], r["layer"], r["head"]): r["accuracy"] for r in records
          if r["split"] == "test_ood" and r["kind"] == "alone"}
  weights = estimators.draw_weights(60, 4, 20, k_labels.SEED)
  chosen = []
  for d in range(20):
    drawn = [i for i in range(60) if weights[i, d]]
    best, top = None, -1
    for step in sorted(examples):
      ex = examples[step]["val_ood"]
      for row, (kind, layer, head) in enumerate(examples[step]["keys"]):
        hits = sum(int(ex["pred"][row, i] == ex["label"][i]) for i in drawn)
        if kind == "alone" and hits > top:
          best, top = (step, layer, head), hits
    chosen.append(test[best])
  assert curve["ood"][0] == pytest.approx(100 * np.mean(chosen))
  assert len(curve["ood_atc"]) == len(curve["k"]) and all(0 <= v <= 100 for v in curve["ood_atc"])
  assert label_free.DEFAULT_OOD_LABELS == 16


def test_gain_fractions_leave_out_and_count_undefined_runs():
  fractions, undefined, missing = selection_table.gain_fractions(
      {"a": 70.0, "b": 60.0, "c": 55.0, "d": float("nan")},
      {"a": 60.0, "b": 60.0, "c": 50.0, "d": 50.0},
      {"a": 80.0, "b": 60.0, "c": 60.0, "d": 60.0})
  assert fractions == [0.5, 0.5] and undefined == 1 and missing == 1


def test_pooled_fraction_is_the_fraction_of_the_summed_gains():
  rule = {"a": 70.0, "b": 60.5, "c": float("nan")}
  full = {"a": 60.0, "b": 60.0, "c": 50.0}
  oracle = {"a": 80.0, "b": 60.1, "c": 60.0}
  # A slow reference: the runs with all three figures, summed gains.
  num = (70.0 - 60.0) + (60.5 - 60.0)
  den = (80.0 - 60.0) + (60.1 - 60.0)
  assert selection_table.pooled_fraction(rule, full, oracle) == pytest.approx(num / den)
  # Run b alone gains 0.1 points and makes its own fraction 5x; pooled stays near a's 0.5.
  per_run, _, _ = selection_table.gain_fractions(rule, full, oracle)
  assert per_run[1] == pytest.approx(5.0)
  assert selection_table.pooled_fraction({"a": 1.0}, {"a": 2.0}, {"a": 2.0}) is None


def test_heads_table_shows_every_rule_and_writes_the_curve(runs, tmp_path, capsys):
  out = str(tmp_path / "out")
  assert heads_main.main(["--table", *runs, "--out", out]) == 0
  printed = capsys.readouterr().out
  assert "gain recovered" in printed
  for name in rules.names(records=True):
    assert f"| {name} | {rules.get(name).reads} |" in printed, name
  result = json.load(open(os.path.join(out, "table.json")))
  curve = result["k_labels"]["dominoes / ViT+ERM"]
  assert curve["runs"] == 2 and curve["k"][-1] == "all" and len(curve["ood"]) == len(curve["k"])
  assert curve["oracle"] == pytest.approx(curve["ood"][-1]) and curve["num_ood_val"] == 60
  rows = {r["rule"]: r for r in result["rows"]}
  assert rows["oracle"]["runs"] == 2 and set(rows) >= set(NEW_RULES)
  assert open(os.path.join(out, "k_labels.png"), "rb").read(4) == b"\x89PNG"
  assert "k_labels.png" in printed


def test_heads_table_on_runs_without_examples_shows_n_a(runs, tmp_path, capsys):
  old = str(tmp_path / "old")
  shutil.copytree(runs[1], old)
  shutil.rmtree(os.path.join(old, "heads_examples"))
  assert heads_main.main(["--table", old, "--select=atc,id_errors"]) == 0
  printed = capsys.readouterr().out
  assert "| atc |" in printed and "Traceback" not in printed
  result = selection_table.build([old], ("atc",))
  atc = next(r for r in result["rows"] if r["rule"] == "atc")
  assert atc["missing"] == 1 and atc["ood"][0] is None and result["k_labels"] == {}
  assert np.isfinite(next(r for r in result["rows"] if r["rule"] == "oracle")["ood"][0])


def test_file_datasets_are_labelled_by_their_folder():
  label = selection_table.dataset_label
  assert label({"name": "dominoes"}) == "dominoes"
  assert label({"name": "npz", "path": "/d/colored_digits/{split}.npz"}) == "npz:colored_digits"
  assert label({"name": "image_folder", "path": "/data/imagenet"}) == "image_folder:imagenet"
