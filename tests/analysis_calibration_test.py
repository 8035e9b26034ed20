"""The reliability-diagram command end to end on a tiny run: its JSON equals the one metric
function (`metrics.classification_metrics`) on the same split, bad flags fail first."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

import testutil  # pylint: disable=g-bad-import-order
from vitreg_jax import data
from vitreg_jax import metrics
from vitreg_jax.training import rundir
from vitreg_jax.training import steps


def _command(*args):
  return subprocess.run([sys.executable, "-m", "vitreg_jax.analysis.calibration", *args],
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_command_matches_classification_metrics(tmp_path):
  workdir = testutil.make_analysis_run(tmp_path / "vit_a", "vit_a")
  testutil.run_analysis_main("calibration", f"--workdir={workdir}", "--batch_size=12",
                             "--calibration_split=test_ood")
  got = json.load(open(tmp_path / "vit_a" / "calibration.json"))
  assert got["split"] == "test_ood" and got["step"] == 1
  cal = got["calibration"]
  bins = cal["bins"]
  assert cal["num_examples"] == 32 and sum(bins["count"]) == 32
  assert len(bins["count"]) == metrics.ECE_BINS and len(bins["edges"]) == metrics.ECE_BINS + 1
  # The reference: the run's eval step over the split, summarized by the one metric function.
  run = rundir.load_run(workdir)
  state = steps.TrainState(step=1, params=run.variables["params"], opt_state={}, rng=None,
                           model_state={k: v for k, v in run.variables.items()
                                        if k != "params"})
  normalize = data.open(run.config.data).normalization
  outs, arrays = [], {"label": [], "mask": []}
  for batch in data.open(run.config.data).eval_iterator("test_ood", global_batch_size=16):
    outs.append(jax.device_get(steps.eval_step(state, batch, None, model=run.model,
                                               normalize=normalize)))
    arrays["label"].append(batch["label"])
    arrays["mask"].append(batch["mask"])
  cat = lambda xs: np.concatenate(xs)
  want = metrics.classification_metrics(
      cat([o["pred"] for o in outs]), cat([o["loss"] for o in outs]),
      {k: cat(v) for k, v in arrays.items()}, confidence=cat([o["confidence"] for o in outs]))
  for key in ("accuracy", "nll", "ece"):
    np.testing.assert_allclose(cal[key], want[key], rtol=1e-5, atol=1e-7)
  png = (tmp_path / "vit_a" / "calibration.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_flags_are_usage_errors(tmp_path):
  res = _command(f"--workdir={tmp_path}", "--bins=0")
  assert res.returncode != 0 and "--bins >= 1" in res.stderr
  assert "Traceback" not in res.stderr
  workdir = testutil.make_analysis_run(tmp_path / "vit_a", "vit_a")
  res = _command(f"--workdir={workdir}", "--calibration_split=test")
  assert res.returncode != 0 and "valid splits" in res.stderr and "test_ood" in res.stderr
  assert "Traceback" not in res.stderr
