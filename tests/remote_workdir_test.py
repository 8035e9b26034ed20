"""A run whose workdir is a remote (non-local) etils.epath path: `fake://` (tests/remote_fs.py).

Trains into it, crashes, resumes, and reads everything back through the same scheme: the
config, metrics.jsonl, the checkpoints (rundir and init_from) and the report. Nothing may be
written to the local working directory (what `open('fake://...')` would do).
"""

import json
import logging
import os
import sys

import jax
import numpy as np
import pytest

from vitreg_jax.models import convert
from vitreg_jax.reports import __main__ as reports_main
from vitreg_jax.reports import runs as report_runs
from vitreg_jax.training import pretrained
from vitreg_jax.training import run_files
from vitreg_jax.training import rundir
from vitreg_jax.training import train
from vitreg_jax.training import train_log

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "workers"))
import remote_fs  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position
from testutil import TINY_TRAIN  # pylint: disable=g-import-not-at-top,wrong-import-position

WORKDIR = "fake://bucket/run"


@pytest.fixture(name="remote")
def remote_fixture(tmp_path, monkeypatch):
  store, cwd = tmp_path / "store", tmp_path / "cwd"
  store.mkdir()
  cwd.mkdir()
  remote_fs.use_root(store)
  remote_fs.patch_orbax(monkeypatch)
  monkeypatch.chdir(cwd)  # A relative `fake:/...` written by mistake would land here.
  yield store
  assert not os.listdir(cwd), os.listdir(cwd)


def _flat(tree):
  return {k: np.asarray(v) for k, v in convert.flatten(tree).items()}


def test_train_crash_resume_and_read_back_on_a_remote_workdir(remote, monkeypatch, caplog):
  config = train_worker.load_config(TINY_TRAIN)
  original = train_log.Reporter.train

  def crash_at_step_7(self, step, measured, *extra):
    if step == 7:
      raise RuntimeError("simulated crash")
    original(self, step, measured, *extra)
  monkeypatch.setattr(train_log.Reporter, "train", crash_at_step_7)
  caplog.set_level(logging.WARNING)
  with pytest.raises(RuntimeError, match="simulated crash"):
    train.train_and_evaluate(config, WORKDIR)
  assert "No TensorBoard events for fake://bucket/run" in caplog.text
  monkeypatch.setattr(train_log.Reporter, "train", original)
  results = train.train_and_evaluate(config, WORKDIR)  # Resumes from step 4.

  local = remote / "bucket" / "run"
  assert {"config.json", "metrics.jsonl", "checkpoints"} <= set(os.listdir(local))
  assert not [f for f in os.listdir(local) if "tfevents" in f]  # Not written anywhere else.
  assert run_files.checkpoint_steps(WORKDIR)[-1] == 12
  assert rundir.load_config(WORKDIR).total_steps == 12
  keys = [(r["step"], r["split"]) for r in map(json.loads, open(local / "metrics.jsonl"))]
  assert len(keys) == len(set(keys)) and (12, "val_id") in keys
  run = report_runs.load(WORKDIR)
  assert run.problems == [] and run.evals["val_id"][12]["accuracy"] == pytest.approx(
      results["val_id"]["accuracy"])
  assert report_runs.find_runs(["fake://bucket"]) == [WORKDIR]
  reports_main.write_report(["fake://bucket"], "fake://bucket/report")
  assert {"report.md", "runs.csv"} <= set(os.listdir(remote / "bucket" / "report"))

  # init_from reads the remote run's checkpoint and a remote .npz.
  saved = rundir.load_run(WORKDIR)
  fresh = saved.model.init(jax.random.PRNGKey(7), np.zeros((1, 32, 16, 3), np.float32))
  loaded = pretrained.init_params_from({"path": WORKDIR}, jax.device_get(fresh["params"]),
                                       model=saved.model, image_hw=(32, 16))
  want = _flat(saved.variables["params"])
  assert _flat(loaded).keys() == want.keys()
  for k, v in _flat(loaded).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  doubled = jax.tree.map(lambda x: 2 * np.asarray(x), saved.variables["params"])
  convert.save_npz("fake://bucket/doubled.npz", doubled)
  loaded = pretrained.init_params_from({"path": "fake://bucket/doubled.npz", "kind": "npz"},
                                       jax.device_get(fresh["params"]), model=saved.model,
                                       image_hw=(32, 16))
  for k, v in _flat(loaded).items():
    np.testing.assert_allclose(v, 2 * want[k], rtol=0, atol=0, err_msg=k)


def test_analysis_and_head_outputs_on_a_remote_path(remote):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from vitreg_jax import plotting  # pylint: disable=g-import-not-at-top
  from vitreg_jax.heads import masks  # pylint: disable=g-import-not-at-top
  from vitreg_jax.analysis import runs  # pylint: disable=g-import-not-at-top
  out = runs.output_dir("fake://bucket/analysis", [WORKDIR])
  runs.write_json(f"{out}/fourier.json", {"a": 1})
  plotting.save_figure(plt.figure(), f"{out}/fourier.png")
  local = remote / "bucket" / "analysis"
  assert json.loads((local / "fourier.json").read_text()) == {"a": 1}
  assert (local / "fourier.png").read_bytes()[:4] == b"\x89PNG"
  mask = np.array([[1, 0], [1, 1]], np.float32)
  masks.save_head_mask(mask, "fake://bucket/run", rule="test")
  np.testing.assert_array_equal(masks.load_head_mask("fake://bucket/run", (2, 2)), mask)


def test_sweep_refuses_a_remote_root_instead_of_writing_locally(remote, capsys):
  from vitreg_jax import sweep  # pylint: disable=g-import-not-at-top
  spec = os.path.join(HERE, "..", "configs", "optimizer_study.py") + ":data=dominoes"
  with pytest.raises(SystemExit):
    sweep.main([spec, "--workdir=fake://bucket/sweep", "--local"])
  assert "give a local or mounted folder" in capsys.readouterr().err
