"""The baselines table (vitreg_jax/reports/baselines.py) on hand-written workdirs, and the head
rules that choose without OOD data (`worst_group`) or without group labels (`id_val`)."""

import json

import numpy as np
import pytest

from vitreg_jax.heads import select
from vitreg_jax.reports import __main__ as report_main
from vitreg_jax.reports import baselines
from vitreg_jax.roles import Roles
from vitreg_jax.roles import split_roles

SPLITS = ("val_id", "val_ood", "test_id", "test_ood")


def m(acc, worst, mean=None):
  out = {"accuracy": acc, "worst_group_accuracy": worst}
  if mean is not None:
    out["train_weighted_mean_accuracy"] = mean
  return out


def write_run(path, *, loss="ce", evals, heads=None, dfr=None, seed=0):
  path.mkdir()
  config = {"seed": seed, "model_name": "vit", "total_steps": max(evals), "regularizers": [],
            "loss": {"name": loss},
            "data": {"name": "dominoes", "eval_splits": list(SPLITS),
                     "sampler": "group_balanced" if loss == "group_dro" else "uniform"}}
  (path / "config.json").write_text(json.dumps(config))
  lines = [{"step": step, "split": "train", "loss": 0.5} for step in evals]
  lines += [{"step": step, "split": split, **metrics}
            for step, by_split in evals.items() for split, metrics in by_split.items()]
  (path / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  if heads:
    (path / "heads.json").write_text(json.dumps(  # as `python -m vitreg_jax.heads` writes it
        {"heads": heads, "dataset": "dominoes", "rule": "worst_group",
         "full": evals[max(evals)], "selected": heads[-1]["alone"]}))
  if dfr:
    (path / "dfr.json").write_text(json.dumps({"heldout_split": "val_id", "dfr": dfr}))


def test_table_reads_every_method_at_its_information_level(tmp_path):
  evals = {  # step 50: better worst group on val_id; step 100: the last checkpoint
      50: {"val_id": m(.8, .40), "val_ood": m(.6, .3), "test_id": m(.81, .2, .82),
           "test_ood": m(.62, .35, .80)},
      100: {"val_id": m(.9, .20), "val_ood": m(.6, .2), "test_id": m(.85, .1, .86),
            "test_ood": m(.60, .15, .84)}}
  heads = [{"layer": 3, "head": 0, "alone": {"val_id": m(.9, .1), "val_ood": m(.7, .1),
                                             "test_id": m(.88, .1, .5), "test_ood": m(.70, .12, .6)}},
           {"layer": 3, "head": 1, "alone": {"val_id": m(.7, .5), "val_ood": m(.6, .5),
                                             "test_id": m(.72, .4, .7), "test_ood": m(.66, .45, .7)}}]
  dfr = {"test_id": m(.8, .6, .75), "test_ood": m(.77, .7, .76)}
  write_run(tmp_path / "erm", evals=evals, heads=heads, dfr=dfr)
  write_run(tmp_path / "gdro", loss="group_dro", evals=evals)
  text, tables = report_main.write_report([str(tmp_path)], str(tmp_path / "out"))
  table = tables[0]
  assert table.name == "baselines"
  got = {(r[1], r[2]): (r[5][0], r[6][0], r[7][0]) for r in table.rows}
  want = {("ERM", "none (last ckpt)"): (85, 84, 15),
          ("ERM", "val groups (WG ckpt)"): (81, 80, 35),
          ("ERM+SEL", "val groups (WG head)"): (72, 70, 45),
          ("ERM+SEL", "OOD val (oracle head)"): (88, 60, 12),
          ("DFR", "val groups (refit on val_id)"): (80, 76, 70),
          ("GroupDRO", "train groups; val-WG ckpt"): (81, 80, 35)}
  assert set(got) == set(want)
  for key, values in want.items():
    np.testing.assert_allclose(got[key], values, err_msg=str(key))
  assert "about 75" not in text  # dominoes: no published figure
  assert baselines.papers.spurious_published("waterbirds", "JTT").startswith("86.7 (Liu")


def test_head_rules_without_ood_data_or_group_labels():
  heads = [{"layer": 0, "head": h, "alone": {"val_id": m(a, w), "val_ood": m(o, 0)}}
           for h, (a, w, o) in enumerate([(.9, .1, .5), (.7, .6, .9), (.8, .3, .6)])]
  roles = Roles("val_id", "val_ood", "test_id", "test_ood")
  full = np.ones((1, 3), np.float32)
  for rule, head in (("worst_group", 1), ("oracle", 1)):
    mask, info = select.select(rule, heads, roles, full, {})
    assert info["head"] == head and mask[0].tolist() == [float(h == head) for h in range(3)]
  # id_val (no group labels): head 0 alone (0.9) beats the full model (0.85) on val_id ...
  mask, info = select.select("id_val", heads, roles, full, {"val_id": m(.85, 0)})
  assert info["chosen"] == "layer 0 head 0" and mask[0].tolist() == [1., 0., 0.]
  # ... and the full model is kept where no head alone does better.
  mask, info = select.select("id_val", heads, roles, full, {"val_id": m(.95, 0)})
  assert info["chosen"] == "full" and mask[0].tolist() == [1., 1., 1.]
  no_groups = [{"layer": 0, "head": 0, "alone": {"val_id": {"accuracy": .5}}}]
  with pytest.raises(ValueError, match="worst_group_accuracy"):
    select.select("worst_group", no_groups, roles, np.ones((1, 1)), {})


def test_waterbirds_id_is_the_train_weighted_mean_and_id_val_reads_no_groups():
  # Waterbirds' `test` is group-balanced within each class: its plain accuracy is not ID.
  roles = split_roles(("train", "val", "test"), dataset="waterbirds")
  assert (roles.id_metric, roles.ood_metric) == ("train_weighted_mean_accuracy",
                                                 "mean_group_accuracy")
  assert split_roles(SPLITS).id_metric == "accuracy"  # dominoes: test_id is drawn like training
  counts = (3498, 184, 56, 1057)  # Waterbirds' training groups
  test = {"accuracy": .80, "worst_group_accuracy": .5, "group0_accuracy": .99,
          "group1_accuracy": .70, "group2_accuracy": .50, "group3_accuracy": .95}
  weighted = sum(c * test[f"group{g}_accuracy"] for g, c in enumerate(counts)) / sum(counts)
  logged = baselines.figures({"test": {**test, "train_weighted_mean_accuracy": weighted}},
                             roles, {})
  assert logged["id"] == pytest.approx(100 * weighted) and logged["id"] != 80.0
  assert logged["mean"] == logged["id"] and logged["worst"] == 50.0
  # id_val keeps reading plain `accuracy` on val (no group labels), whatever id_metric is.
  heads = [{"layer": 0, "head": h, "alone": {"val": {"accuracy": a,
                                                     "train_weighted_mean_accuracy": w}}}
           for h, (a, w) in enumerate([(.9, .5), (.6, .99)])]
  _, info = select.select("id_val", heads, roles, np.ones((1, 2), np.float32),
                          {"val": {"accuracy": .7, "train_weighted_mean_accuracy": .8}})
  assert info["chosen"] == "layer 0 head 0" and info["metric"] == "accuracy"
