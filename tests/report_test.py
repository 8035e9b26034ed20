"""Tests of vitreg_jax.report on hand-written workdirs (config.json + metrics.jsonl).

The figures in the workdirs are chosen so every table cell can be checked by hand: mean and
sample std over seeds, the paper's figure and the difference, and the status of broken runs.
"""

import csv
import json
import math
import os

import numpy as np
import pytest

from vitreg_jax.reports import __main__ as reports_main
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


def test_poster_table_mean_std_paper_and_status(poster_runs):
  groups = runs_lib.group_runs([runs_lib.load(w) for w in runs_lib.find_runs([poster_runs])])
  assert sorted(len(g.runs) for g in groups) == [2, 2]   # grouped by everything but seed
  table = tables_lib.poster_table(groups)
  rows = {r[1]: r for r in table.rows}
  assert set(rows) == {"ViT+ERM", "ViT+DIV", "ViT+DIV+SEL"}
  erm = rows["ViT+ERM"]
  assert erm[3] == "ok"
  np.testing.assert_allclose(erm[4][:2], (85.0, math.sqrt(50.0)))   # 90, 80: std sqrt(50)
  assert erm[4][2] == 2 and erm[5] == "88.80 ± 0.10" and erm[6] == "-3.80"
  np.testing.assert_allclose(erm[7][:2], (55.0, math.sqrt(50.0)))
  assert erm[8] == "56.87 ± 4.30" and erm[9] == "-1.87"
  div = rows["ViT+DIV"]
  assert "seed 1: unfinished (50/100)" in div[3] and "seed 1: missing test_ood" in div[3]
  np.testing.assert_allclose(div[4][:2], (87.0, math.sqrt(2.0)))   # both seeds have test_id
  assert div[7] == (70.0, None, 1)                                 # only seed 0 has test_ood
  sel = rows["ViT+DIV+SEL"]
  assert sel[3] == "heads.json in 1/2" and sel[4] == (91.0, None, 1) and sel[5] == "89.86 ± 1.10"
  assert sel[9] == "+4.92"                                         # 75 - 70.08
  md = table.markdown()
  assert "| mnist_cifar | ViT+ERM | 2 | ok | 85.00 ± 7.07 (n=2) | 88.80 ± 0.10 | -3.80 |" in md


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
  assert tables_lib._time_to(run, "test_id", 0.75) == (75, 50.0)
  assert tables_lib._time_to(run, "test_id", 0.95) == (None, None)
  table = tables_lib.runs_table(runs_lib.group_runs([run]), 0.75, "test_id")
  assert table.rows[0][-2:] == ["75", "50.0"]


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
    make_run(root, clf, config, [train(10, 0.5), (10, "test", {"accuracy": acc}),
                                 (10, "fog_1", {"accuracy": acc - 0.1}),
                                 (10, "fog_2", {"accuracy": acc - 0.2})])
  groups = runs_lib.group_runs([runs_lib.load(w) for w in runs_lib.find_runs([root])])
  arvit = tables_lib.arvit_table(groups)
  (row,) = arvit.rows
  assert row[:2] == ["ARViT-L3", "ok"] and row[2] == (85.0, None, 1)
  assert row[3] == 84.76 and row[4] == "+0.24" and row[5] == (None, None, 0)
  hvw = {r[1]: r for r in tables_lib.how_vits_work_table(groups).rows}
  assert set(hvw) == {"ViT (CLS)", "ViT (GAP)"}
  np.testing.assert_allclose(hvw["ViT (GAP)"][5][0], 39.0)        # mean of 44 and 34
  assert hvw["ViT (GAP)"][6:] == ["GAP - CLS: +2.70", "+4.00", "+1.30"]


def test_sel_rows_agree_with_the_heads_table(tmp_path):
  # One implementation (vitreg_jax/reports/papers.py, tables.py) behind the report's poster rows and
  # `python -m vitreg_jax.heads --table`: the same runs give the same methods and figures.
  root = str(tmp_path)
  roles = {"test_id": "test", "test_ood": "test", "id_metric": "accuracy",
           "ood_metric": "mean_group_accuracy"}
  waterbirds = lambda seed, reg: dict(mnist_cifar(seed, reg), data={
      "name": "waterbirds", "eval_splits": ["val", "test"]})
  test = lambda acc, wg: {"accuracy": acc, "mean_group_accuracy": acc - 0.05,
                          "worst_group_accuracy": wg}
  workdirs = []
  for seed, (acc, wg) in enumerate(((0.96, 0.80), (0.94, 0.70))):
    config = waterbirds(seed, "div")
    config["regularizers"][0]["weight"] = 0.0   # DIV switched off: this is an ERM run
    workdirs.append(make_run(root, f"wb{seed}", config,
                             [train(100, 0.3), (100, "test", test(acc, wg))],
                             heads={"dataset": "waterbirds", "rule": "oracle", "roles": roles,
                                    "full": {"test": test(acc, wg)},
                                    "selected": {"test": test(acc + 0.01, wg + 0.1)}}))
  groups = runs_lib.group_runs([runs_lib.load(w) for w in workdirs])
  rows = {r[1]: r for r in tables_lib.poster_table(groups).rows}
  assert set(rows) == {"ViT+ERM", "ViT+ERM+SEL"}
  data = tables_lib.poster_table_data(workdirs)["rows"]
  for method in ("ViT+ERM", "ViT+ERM+SEL"):
    np.testing.assert_allclose(rows[method][4][:2], (np.mean(data[method]["id"]),
                                                     np.std(data[method]["id"], ddof=1)))
    # The report's Waterbirds OOD column is the worst group, the heads table's own column.
    np.testing.assert_allclose(rows[method][7][:2], (np.mean(data[method]["worst_group"]),
                                                     np.std(data[method]["worst_group"], ddof=1)))
  np.testing.assert_allclose(rows["ViT+ERM+SEL"][7][0], 85.0)
  assert rows["ViT+ERM+SEL"][8] == "85.70 ± 1.60"
  assert "| ViT+ERM+SEL | 96.00 ± 1.41 | 91.00 ± 1.41 | 85.00 ± 7.07 | 2 | 96.50 ± 0.5 / 85.70 ± 1.6 |" \
      in tables_lib.heads_poster_table(workdirs)
