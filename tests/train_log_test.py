"""metrics.jsonl after a resume: each (step, split) once, and the report reads it back."""

import json
import os
import sys

import pytest

from vitreg_jax.reports import runs as report_runs
from vitreg_jax.training import train
from vitreg_jax.training import train_log

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "workers"))
import testutil  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position


def _keys(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["split"]) for r in map(json.loads, f)]


def test_jsonl_writer_drops_lines_past_the_restored_step(tmp_path):
  lines = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (2, 4, 6, 8)]
  text = "".join(json.dumps(l) + "\n" for l in lines) + '{"step": 10, "spl'  # Cut by a kill.
  (tmp_path / "metrics.jsonl").write_text(text)
  writer = train_log.JsonlWriter(str(tmp_path), start_step=4)
  assert _keys(tmp_path) == [(2, "train"), (4, "train")]
  writer.write(6, "train", {"loss": 0.5})
  writer.write(6, "val", {"accuracy": 0.75})
  assert _keys(tmp_path) == [(2, "train"), (4, "train"), (6, "train"), (6, "val")]
  evals, trained = report_runs.read_metrics(str(tmp_path))
  assert trained[6] == {"loss": 0.5} and evals == {"val": {6: {"accuracy": 0.75}}}


def test_crashed_then_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
  config = train_worker.load_config(testutil.TINY_TRAIN)
  original = train_log.Reporter.train

  def crash_at_step_7(self, step, measured, *extra):
    if step == 7:  # After step 6 was logged, past the checkpoint of step 4.
      raise RuntimeError("simulated crash")
    original(self, step, measured, *extra)
  monkeypatch.setattr(train_log.Reporter, "train", crash_at_step_7)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(config, str(tmp_path))
  assert (6, "train") in _keys(tmp_path)
  monkeypatch.setattr(train_log.Reporter, "train", original)
  results = train.train_and_evaluate(config, str(tmp_path))

  keys = _keys(tmp_path)
  assert len(keys) == len(set(keys)), sorted(keys)
  assert {(s, "train") for s in range(2, 13, 2)} <= set(keys)
  for split in results:  # The evaluation of step 4 (before its checkpoint) kept once; the
    assert {(4, split), (8, split), (12, split)} <= set(keys)  # final one present.
  run = report_runs.load(str(tmp_path))
  assert run.problems == [] and run.last_step() == 12
  assert {s: run.evals[s][12]["accuracy"] for s in results} == pytest.approx(
      {s: m["accuracy"] for s, m in results.items()})
