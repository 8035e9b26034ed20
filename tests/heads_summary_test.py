"""The authors' statistics (heads/summary.py) against a slow reference on a hand-written
heads_eval.jsonl, and the poster table that `heads --table` and `report` both print."""

import json

import numpy as np
import pytest

from vitreg_jax import errors
from vitreg_jax.heads import summary
from vitreg_jax.heads import training
from vitreg_jax.roles import split_roles

SPLITS = ("val_id", "val_ood", "test_id", "test_ood")
STEPS = (100, 200, 300)
HEADS = 4
# Hand-written accuracies [split][step] -> (full, head0..head3); conflict accuracies on val_id.
ACC = {
    "val_id": [(0.90, 0.88, 0.85, 0.86, 0.89), (0.92, 0.90, 0.84, 0.87, 0.91),
               (0.91, 0.93, 0.83, 0.86, 0.90)],
    "val_ood": [(0.70, 0.66, 0.72, 0.69, 0.70), (0.73, 0.65, 0.75, 0.70, 0.71),
                (0.72, 0.64, 0.75, 0.74, 0.69)],   # 0.75 twice: the earlier step wins
    "test_id": [(0.89, 0.87, 0.84, 0.85, 0.88), (0.91, 0.89, 0.83, 0.86, 0.90),
                (0.90, 0.92, 0.82, 0.85, 0.89)],
    "test_ood": [(0.69, 0.65, 0.71, 0.68, 0.69), (0.71, 0.64, 0.77, 0.69, 0.70),
                 (0.70, 0.63, 0.74, 0.73, 0.68)],
}
CONFLICT = [(0.30, 0.20, 0.60, 0.40, 0.35), (0.35, 0.25, 0.55, 0.45, 0.30),
            (0.32, 0.10, 0.50, 0.62, 0.30)]


def records():
  out = []
  for split in SPLITS:
    for i, step in enumerate(STEPS):
      for j, acc in enumerate(ACC[split][i]):
        r = {"step": step, "split": split, "kind": "full" if j == 0 else "alone",
             "layer": None if j == 0 else 3, "head": None if j == 0 else j - 1,
             "accuracy": acc, "spurious_accuracy": 1 - acc}
        if split == "val_id":
          r["conflict_accuracy"] = CONFLICT[i][j]
        out.append(r)
  return out


def reference(rule):
  """The authors' get_experiment_summary on [steps, heads] arrays, in NumPy: full model at
  idxmax over steps of val_ood; best head at argmax over (steps, heads) of val_ood."""
  a = {s: np.array(ACC[s]) for s in SPLITS}
  if rule == "full":
    i = int(np.argmax(a["val_ood"][:, 0]))          # first maximum, like pandas idxmax
    return STEPS[i], None, a["test_ood"][i, 0], a["test_id"][i, 0]
  if rule == "oracle":
    heads = a["val_ood"][:, 1:]
    i, j = np.unravel_index(np.argmax(heads), heads.shape)
    return STEPS[i], j, a["test_ood"][i, 1 + j], a["test_id"][i, 1 + j]
  table = np.array(CONFLICT) if rule == "id_conflict" else a["val_id"]
  i, j = np.unravel_index(np.argmax(table), table.shape)  # column 0 = full model
  return STEPS[i], (None if j == 0 else j - 1), a["test_ood"][i, j], a["test_id"][i, j]


@pytest.mark.parametrize("rule", ["full", "oracle", "id_conflict", "id_val"])
def test_authors_statistics_equal_the_slow_reference(rule):
  roles = split_roles(SPLITS)
  got = summary.summarize(records(), roles)[rule]
  step, head, ood, idd = reference(rule)
  assert (got["step"], got["head"]) == (step, head)
  assert got["metrics"]["test_ood"]["accuracy"] == pytest.approx(ood)
  assert got["metrics"]["test_id"]["accuracy"] == pytest.approx(idd)


def test_the_hand_written_case_exercises_the_statistics():
  # The chosen steps differ from the last one and the oracle's tie goes to the earlier step,
  # so a final-checkpoint or a latest-step tie-break implementation would fail above.
  assert reference("full")[0] == 200 and reference("oracle")[:2] == (200, 1)
  assert reference("id_conflict")[:2] == (300, 2) and reference("id_val")[:2] == (300, 0)


def test_final_statistic_reads_the_last_evaluation_only():
  roles = split_roles(SPLITS)
  got = summary.summarize(records(), roles, statistic="final")
  assert got["full"]["step"] == 300 and got["full"]["kind"] == "full"
  assert got["full"]["metrics"]["test_ood"]["accuracy"] == pytest.approx(0.70)
  assert (got["oracle"]["step"], got["oracle"]["head"]) == (300, 1)


def test_no_records_names_the_fix():
  with pytest.raises(ValueError, match="head_eval"):
    summary.summarize([], split_roles(SPLITS))


def test_reads_the_jsonl_a_run_writes(tmp_path):
  with open(tmp_path / training.HEAD_EVAL_FILE, "w") as f:
    for r in records():
      f.write(json.dumps(r) + "\n")
  got = summary.summarize(training.read_head_eval(str(tmp_path)), split_roles(SPLITS))
  assert (got["oracle"]["step"], got["oracle"]["head"]) == (200, 1)


def test_rules_without_their_figures_give_an_empty_row_and_mask_rules_are_refused():
  roles = split_roles(SPLITS)
  got = summary.summarize(records(), roles, rules=("worst_group", "oracle"))
  assert got["worst_group"] is None  # no group figures logged: an empty row, no error
  assert got["full"]["step"] == 200 and (got["oracle"]["step"], got["oracle"]["head"]) == (200, 1)
  with pytest.raises(errors.UserError, match="'greedy' builds head masks"):
    summary.summarize(records(), roles, rules=("greedy",))
  with pytest.raises(errors.UserError, match="statistic"):
    summary.summarize(records(), roles, statistic="best")


def test_every_logged_figure_reaches_the_chosen_metrics():
  # A figure a later version logs per evaluation (here a confidence) is there for rules.
  logged = [dict(r, mean_confidence=0.5) for r in records()]
  got = summary.summarize(logged, split_roles(SPLITS))
  assert got["oracle"]["metrics"]["val_ood"]["mean_confidence"] == 0.5
