"""Tests of vitreg_jax.reports on hand-written workdirs (config.json + metrics.jsonl).

The figures in the workdirs are chosen so every table cell can be checked by hand: mean and
sample std over seeds, the paper's figure and the difference, and the status of broken runs.
"""

import csv
import json
import math
import os

import numpy as np
import pytest

from vitreg_jax import errors
from vitreg_jax.reports import __main__ as reports_main
from vitreg_jax.reports import arvit as arvit_report
from vitreg_jax.reports import papers
from vitreg_jax.reports import runs as runs_lib
from vitreg_jax.reports import tables as tables_lib


def make_run(root, name, config, lines, heads=None):
  """A fake run directory: the resolved config and metrics.jsonl lines (step, split, metrics)."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step, split, metrics in lines:
      f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
  if heads is not None:
    with open(os.path.join(workdir, "heads.json"), "w") as f:
      json.dump(heads, f)
  return workdir


def mnist_cifar(seed, reg=None, steps=100):
  return {"seed": seed, "model_name": "vit", "model": {"width": 32}, "total_steps": steps,
          "batch_size": 8, "optimizer": {"name": "adam", "lr": 1e-3},
          "regularizers": [{"name": "div", "weight": 100.0, "layers": [-1]}] if reg else [],
          "data": {"name": "mnist_cifar",
                   "eval_splits": ["val_id", "val_ood", "test_id", "test_ood"]}}


def evals(step, id_acc, ood_acc, splits=("val_id", "val_ood", "test_id", "test_ood")):
  acc = {"val_id": id_acc, "test_id": id_acc, "val_ood": ood_acc, "test_ood": ood_acc}
  return [(step, s, {"accuracy": acc[s], "loss": 0.5}) for s in splits]


def train(step, loss, elapsed=None, **more):
  metrics = {"loss": loss, **more}
  if elapsed is not None:
    metrics["elapsed_s"] = elapsed
  return (step, "train", metrics)


@pytest.fixture
def poster_runs(tmp_path):
  root = str(tmp_path)
  # ERM: two seeds, final test_id 0.90 / 0.80, test_ood 0.60 / 0.50. The seed-0 run was
  # resumed: its step-100 lines were written twice, the later (0.90 / 0.60) counts.
  make_run(root, "erm_s0", mnist_cifar(0), [train(50, 1.0)] + evals(50, 0.7, 0.4)
           + [train(100, 0.5)] + evals(100, 0.1, 0.1) + [train(100, 0.4)]
           + evals(100, 0.90, 0.60))
  make_run(root, "erm_s1", mnist_cifar(1), [train(100, 0.6)] + evals(100, 0.80, 0.50))
  # DIV: seed 0 finished (with a head selection), seed 1 stopped at step 50 and lost test_ood.
  make_run(root, "div_s0", mnist_cifar(0, "div"),
           [train(100, 0.5, **{"reg/div": 0.01})] + evals(100, 0.88, 0.70),
           heads={"full": {"test_id": {"accuracy": 0.88}, "test_ood": {"accuracy": 0.70}},
                  "selected": {"test_id": {"accuracy": 0.91}, "test_ood": {"accuracy": 0.75}}})
  make_run(root, "div_s1", mnist_cifar(1, "div"),
           [train(50, 0.7, **{"reg/div": 0.02})]
           + evals(50, 0.86, 0.66, splits=("val_id", "val_ood", "test_id")))
  return root


def test_read_metrics_later_line_supersedes(poster_runs):
  evals_, train_ = runs_lib.read_metrics(os.path.join(poster_runs, "erm_s0"))
  assert evals_["test_id"][100]["accuracy"] == 0.90 and evals_["test_ood"][50]["accuracy"] == 0.4
  assert train_[100]["loss"] == 0.4 and sorted(train_) == [50, 100]


def test_poster_table_mean_std_paper_and_authors_step(poster_runs):
  groups = runs_lib.group_runs([runs_lib.load(w) for w in runs_lib.find_runs([poster_runs])])
  assert sorted(len(g.runs) for g in groups) == [2, 2]   # grouped by everything but seed
  table = tables_lib.report_poster_table(groups)
  # No heads_eval.jsonl in these runs: full-model rows only, from metrics.jsonl.
  rows = {r[1]: r for r in table.rows}
  assert set(rows) == {"ViT+ERM", "ViT+DIV"} and "without heads_eval.jsonl" in table.note
  erm = rows["ViT+ERM"]
  # Seed 0 at step 100 (val_ood 0.60 beats step 50's 0.40): the authors' step.
  np.testing.assert_allclose(erm[4][:2], (85.0, math.sqrt(50.0)))   # 90, 80: std sqrt(50)
  assert erm[4][2] == 2 and erm[5] == "88.80 ± 0.10" and erm[6] == "-3.80"
  np.testing.assert_allclose(erm[7][:2], (55.0, math.sqrt(50.0)))
  assert erm[8] == "56.87 ± 4.30" and erm[9] == "-1.87" and erm[10] == "100,100"
  div = rows["ViT+DIV"]
  np.testing.assert_allclose(div[4][:2], (87.0, math.sqrt(2.0)))   # both seeds have test_id
  assert div[7] == (70.0, None, 1)                                 # only seed 0 has test_ood
  md = table.markdown()
  assert "| mnist_cifar | ViT+ERM | - | 2 | 85.00 ± 7.07 (n=2) | 88.80 ± 0.10 | -3.80 |" in md


def test_final_statistic_is_one_flag_away(tmp_path):
  # ERM: the best val_ood (0.80) at step 50, the final step 100 is worse (0.60).
  run = make_run(str(tmp_path), "erm", mnist_cifar(0), [train(100, 0.5)] + evals(50, 0.9, 0.8)
                 + evals(100, 0.85, 0.6))
  authors = tables_lib.poster_table([run]).rows[0]
  final = tables_lib.poster_table([run], statistic="final")
  assert authors[7][0] == pytest.approx(80.0) and authors[10] == "50"
  assert final.rows[0][7][0] == pytest.approx(60.0) and final.rows[0][10] == "100"
  assert "FINAL CHECKPOINT" in final.note


def test_cli_writes_markdown_csv_and_curves(poster_runs, tmp_path, capsys):
  out = str(tmp_path / "out")
  assert reports_main.main([poster_runs, "--out", out, "--target", "0.85"]) == 0
  assert "Head diversity (poster Tables 1-2)" in capsys.readouterr().out
  assert {"report.md", "poster.csv", "runs.csv", "curves_poster.png",
          "curves_runs.png"} <= set(os.listdir(out))
  with open(os.path.join(out, "poster.csv")) as f:
    rows = list(csv.DictReader(f))
  erm = next(r for r in rows if r["method"] == "ViT+ERM")
  assert float(erm["ID acc. mean"]) == pytest.approx(85.0)
  assert float(erm["ID acc. std"]) == pytest.approx(math.sqrt(50))
  assert os.path.getsize(os.path.join(out, "curves_poster.png")) > 10_000


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="No run under"):
    runs_lib.find_runs([str(tmp_path)])
  with pytest.raises(FileNotFoundError, match="not a directory"):
    runs_lib.find_runs([str(tmp_path / "missing")])


def test_diverged_and_failed_runs_are_marked(tmp_path):
  root = str(tmp_path)
  make_run(root, "nan", mnist_cifar(0), [train(10, float("nan"))])
  failed = make_run(root, "failed", mnist_cifar(1, "div"), [train(10, 0.5)])
  with open(os.path.join(failed, "sweep_failed.json"), "w") as f:
    json.dump({"rc": 1, "log_tail": "NonFiniteLossError: Non-finite loss or gradient"}, f)
  runs = {os.path.basename(w): runs_lib.load(w) for w in runs_lib.find_runs([root])}
  assert runs["nan"].problems[:1] == ["diverged"]
  assert "diverged" in runs["failed"].problems
  assert any(p.startswith("unfinished (10/100)") for p in runs["failed"].problems)


def test_runs_table_steps_and_time_to_target_across_a_resume(tmp_path):
  root = str(tmp_path)
  config = mnist_cifar(0)
  # Session 1 ends at step 50 after 30 s; session 2 restarts the clock: step 75 at 20 s.
  make_run(root, "a", config, [train(25, 1.0, 10.0), train(50, 0.8, 30.0)]
           + evals(50, 0.6, 0.5) + [train(75, 0.6, 20.0)] + evals(75, 0.8, 0.5)
           + [train(100, 0.5, 35.0)] + evals(100, 0.9, 0.5))
  run = runs_lib.load(os.path.join(root, "a"))
  table = tables_lib.runs_table(runs_lib.group_runs([run]), 0.75, "test_id")
  assert table.rows[0][-2:] == ["75", "50.0"]
  missed = tables_lib.runs_table(runs_lib.group_runs([run]), 0.95, "test_id")
  assert missed.rows[0][-2:] == ["not reached", None]


def test_groups_are_labelled_by_what_differs(tmp_path):
  root = str(tmp_path)
  for model, extra in (("vit", {"width": 32}), ("resnet", {"depth": 18})):
    for opt in ("sgd", "adam"):
      config = dict(mnist_cifar(0), model_name=model, model=extra,
                    optimizer={"name": opt, "lr": 0.1})
      make_run(root, f"{model}_{opt}", config, [train(100, 0.5)] + evals(100, 0.9, 0.5))
  labels = [g.label for g in runs_lib.group_runs(
      [runs_lib.load(w) for w in runs_lib.find_runs([root])])]
  # model.width / model.depth exist for one family only: implied by model_name.
  assert labels == ["model_name=resnet, optimizer.name=adam", "model_name=resnet, optimizer.name=sgd",
                    "model_name=vit, optimizer.name=adam", "model_name=vit, optimizer.name=sgd"]


def test_arvit_and_how_vits_work_tables(tmp_path):
  root = str(tmp_path)
  base = {"seed": 0, "total_steps": 10, "batch_size": 8}
  l3 = dict(base, model_name="arvit", model={"variant": "paper"},
            regularizers=[{"name": "distance", "weight": 0.01, "layers": [2]}],
            data={"name": "cifar10", "eval_splits": ["test"]})
  make_run(root, "l3", l3, [train(10, 0.5), (10, "test", {"accuracy": 0.85})])
  for clf, acc in (("token", 0.50), ("gap", 0.54)):
    config = dict(base, model_name="vit", model={"variant": "Ti/4", "classifier": clf},
                  data={"name": "cifar100_corrupted"})
    make_run(root, clf, config, [train(10, 0.5),
                                 (10, "test", {"accuracy": acc, "nll": 2.0, "ece": 0.05}),
                                 (10, "fog_1", {"accuracy": acc - 0.1, "nll": 3.0}),
                                 (10, "fog_2", {"accuracy": acc - 0.2, "nll": 4.0})])
  groups = runs_lib.group_runs([runs_lib.load(w) for w in runs_lib.find_runs([root])])
  arvit = tables_lib.arvit_table(groups)
  (row,) = arvit.rows
  assert row[:2] == ["ARViT-L3", "ok"] and row[2] == (85.0, None, 1)
  assert row[3] == 84.76 and row[4] == "+0.24" and row[5] == (None, None, 0)
  hvw = {r[1]: r for r in tables_lib.how_vits_work_table(groups).rows}
  assert set(hvw) == {"ViT (CLS)", "ViT (GAP)"}
  gap = hvw["ViT (GAP)"]
  # test acc., NLL, ECE (%), then over the corrupted splits: acc. (mean of 44 and 34), NLL.
  np.testing.assert_allclose([c[0] for c in gap[4:9]], [54.0, 2.0, 5.0, 39.0, 3.5])
  assert gap[9] == (None, None, 0)  # no ECE logged under fog
  assert gap[10:] == ["GAP - CLS: +2.70", "+4.00", "+1.30"]


def _head_eval(workdir, lines):
  with open(os.path.join(workdir, "heads_eval.jsonl"), "w") as f:
    for step, split, kind, head, metrics in lines:
      f.write(json.dumps({"step": step, "split": split, "kind": kind,
                          "layer": None if head is None else 1, "head": head, **metrics}) + "\n")


def test_report_and_heads_table_are_one_table(tmp_path, capsys):
  # One implementation (tables.poster_table) behind the report's poster rows and `python -m
  # vitreg_jax.heads --table`; Waterbirds' ID is the train-weighted mean accuracy, its OOD
  # the mean group accuracy, worst group beside.
  from vitreg_jax.heads import __main__ as heads_main  # pylint: disable=g-import-not-at-top
  root = str(tmp_path)
  fig = lambda acc, wg: {"accuracy": acc, "mean_group_accuracy": acc - 0.05,
                         "train_weighted_mean_accuracy": acc + 0.01,
                         "worst_group_accuracy": wg, "conflict_accuracy": wg}
  workdirs = []
  for seed, (acc, wg) in enumerate(((0.96, 0.80), (0.94, 0.70))):
    config = dict(mnist_cifar(seed), data={"name": "waterbirds", "eval_splits": ["val", "test"]})
    w = make_run(root, f"wb{seed}", config, [train(100, 0.3), (100, "test", fig(acc, wg))])
    _head_eval(w, [(step, split, kind, head, fig(acc + d, wg + d))
                   for step, d0 in ((50, 0.0), (100, 0.01)) for split in ("val", "test")
                   for kind, head, d1 in (("full", None, 0.0), ("alone", 0, 0.02),
                                          ("alone", 1, -0.3))
                   for d in [d0 + d1]])
    workdirs.append(w)
  groups = runs_lib.group_runs([runs_lib.load(w) for w in workdirs])
  report_rows = tables_lib.report_poster_table(groups).rows
  table = tables_lib.poster_table(workdirs)
  assert report_rows == table.rows
  rows = {(r[1], r[2].split(":")[0]): r for r in table.rows}
  erm, sel = rows[("ViT+ERM", "-")], rows[("ViT+ERM+SEL", "oracle")]
  # Step 100 (val mean-group 0.92 / 0.90 beats step 50's); OOD = test mean group accuracy.
  np.testing.assert_allclose(erm[4][:2], (97.0, math.sqrt(2.0)))   # ID: not `accuracy` (96)
  np.testing.assert_allclose(erm[7][:2], (91.0, math.sqrt(2.0)))
  np.testing.assert_allclose(erm[10][:2], (76.0, math.sqrt(50.0)))   # worst group, own column
  np.testing.assert_allclose(sel[7][0], 93.0)                         # head 0 at step 100
  assert sel[8] == "85.70 ± 1.60" and erm[8] == "83.37 ± 0.40"
  assert rows[("ViT+ERM+SEL", "id_val")][8] == "-"                   # no poster figure
  assert heads_main.main(["--table", *workdirs]) == 0
  assert table.markdown() in capsys.readouterr().out
  # The spread is labelled; --std=authors is their np.std (ddof 0): 90, 92 -> 1, not sqrt(2).
  assert "sample std over runs (ddof=1)" in table.note
  authors = tables_lib.poster_table(workdirs, std="authors")
  erm_authors = {(r[1], r[2].split(":")[0]): r for r in authors.rows}[("ViT+ERM", "-")]
  np.testing.assert_allclose(erm_authors[7][:2], (91.0, 1.0))
  np.testing.assert_allclose(erm_authors[10][:2], (76.0, 5.0))
  assert "ddof=0" in authors.note and "ddof=1" not in authors.note
  assert heads_main.main(["--table", *workdirs, "--std=authors"]) == 0
  assert authors.markdown() in capsys.readouterr().out
  assert tables_lib.report_poster_table(groups, std="authors").rows == authors.rows
  with pytest.raises(errors.UserError, match="--std must be one of"):
    tables_lib.poster_table(workdirs, std="ddof0")

def test_arvit_embedded_table_splits_pretrained_and_scratch(tmp_path):
  root = str(tmp_path)
  base = {"total_steps": 500, "batch_size": 80, "model_name": "arvit",
          "model": {"variant": "paper", "patch_size": 4, "width": 96}, "regularizers": [],
          "data": {"name": "embedded", "eval_splits": ["val", "test"]}}
  r1 = dict(base, regularizers=[{"name": "similarity", "weight": 0.01, "layers": [0]}])
  accs = {("base", "rot"): (0.40, 0.44, 0.45), ("base", "scratch"): (0.30, 0.32, 0.31),
          ("r1", "rot"): (0.50,)}
  for (row, init), values in accs.items():
    for seed, acc in enumerate(values):
      config = dict(base if row == "base" else r1, seed=seed)
      if init == "rot":  # each seed fine-tunes its own pretraining run
        config["init_from"] = {"path": f"/runs/{row}_rot_s{seed}", "kind": "checkpoint"}
      make_run(root, f"{row}_{init}_s{seed}", config,
               [train(500, 0.5), (500, "val", {"accuracy": 0.9}),
                (500, "test", {"accuracy": acc})])
  # Neither the pretraining run nor a CIFAR-10 run is a row of this table.
  make_run(root, "base_pretrain", dict(base, data={"name": "embedded_rotation"}),
           [train(1000, 1.0), (1000, "val", {"accuracy": 0.6})])
  make_run(root, "cifar", dict(base, data={"name": "cifar10"}),
           [train(10, 0.5), (10, "test", {"accuracy": 0.7})])
  groups = runs_lib.group_runs([runs_lib.load(w) for w in runs_lib.find_runs([root])])
  table = arvit_report.arvit_embedded_table(groups)
  rows = {(r[0], r[1]): r for r in table.rows}
  assert list(rows) == [("ARViT-Base", "rotation"), ("ARViT-Base", "scratch"),
                        ("ARViT-R1-1", "rotation")]
  rot, scratch, r1_rot = rows.values()
  # Three seeds pooled although their init_from paths differ: mean and sample std by hand.
  np.testing.assert_allclose(rot[4][:2], [43.0, math.sqrt(7.0)])
  assert rot[4][2] == 3 and rot[2] == "ok" and rot[3] == "500"
  np.testing.assert_allclose(scratch[4][:2], [31.0, 1.0])
  assert rot[5] == "+12.00" and scratch[5] is None
  # The thesis' CIFAR-10 figure of the row, on pretrained rows only.
  assert rot[6] == 83.13 and scratch[6] is None and r1_rot[6] == 88.29
  assert r1_rot[4] == (50.0, None, 1) and r1_rot[5] is None
  assert "different dataset" in table.header[6]
  # The report command writes it (Markdown and CSV) beside the other tables.
  text, _ = reports_main.write_report([root], str(tmp_path / "out"))
  assert "ARViT (Table 1) on embedded data" in text
  assert (tmp_path / "out" / "arvit_embedded.csv").exists()


def test_arvit_embedded_table_flags_pooled_configs_that_differ(tmp_path):
  root = str(tmp_path)
  for seed, lr in ((0, 1e-3), (1, 3e-4)):
    config = {"seed": seed, "total_steps": 5, "model_name": "arvit", "model": {},
              "optimizer": {"lr": lr}, "data": {"name": "embedded"}}
    make_run(root, f"s{seed}", config, [train(5, 0.5), (5, "test", {"accuracy": 0.3})])
  groups = runs_lib.group_runs([runs_lib.load(w) for w in runs_lib.find_runs([root])])
  (row,) = arvit_report.arvit_embedded_table(groups).rows
  assert "2 configs pooled" in row[2] and row[4][2] == 2


def test_arvit_row_names_a_non_default_penalty_weight():
  base = {"model_name": "arvit", "model": {"variant": "paper"}}
  reg = {"name": "similarity", "layers": [0], "weight": papers.ARVIT_WEIGHT}
  assert papers.arvit_row(dict(base, regularizers=[reg])) == "ARViT-R1-1"
  assert papers.arvit_row(dict(base, regularizers=[dict(reg, weight=1.0)])) == "ARViT-R1-1 (λ=1)"
  dist = {"name": "distance", "layers": [2], "weight": 0.5}
  assert papers.arvit_row(dict(base, regularizers=[dist])) == "ARViT-L3 (λ=0.5)"
