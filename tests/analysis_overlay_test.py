"""The analysis commands overlay several runs: two `--workdir`s give one JSON holding both runs
and one PNG, in `--out`; several workdirs without `--out` fail first.

Two tiny ViTs of different widths keep this fast (a ResNet's Hessian-vector product alone
compiles for a minute on the shared CPU); the ViT-vs-ResNet overlay is the same code path and
is run on the quickstart models in docs/analysis.md."""

import json
import os
import subprocess
import sys

import pytest

import testutil

MODELS = testutil.ANALYSIS_VITS
ARGS = testutil.TINY_ANALYSIS_ARGS
FIGURES = {"hessian": "eigenvalues", "fourier": "blocks", "noise": "sweep", "landscape": "grid",
           "variance": "blocks", "calibration": "calibration"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  return [testutil.make_analysis_run(root / name, name) for name in MODELS]


def _command(analysis, workdirs, out=None):
  argv = [sys.executable, "-m", f"vitreg_jax.analysis.{analysis}", *ARGS[analysis],
          *[f"--workdir={w}" for w in workdirs], *([f"--out={out}"] if out else [])]
  return subprocess.run(argv, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("analysis", sorted(ARGS))
def test_two_workdirs_give_one_json_and_one_png(analysis, two_runs, tmp_path):
  testutil.run_analysis_main(analysis, *ARGS[analysis], *[f"--workdir={w}" for w in two_runs],
                             f"--out={tmp_path}")
  result = json.load(open(tmp_path / f"{analysis}.json"))
  assert [r["label"] for r in result["runs"]] == list(MODELS)
  for run in result["runs"]:
    assert run[FIGURES[analysis]], run  # each run has its own figures
  png = (tmp_path / f"{analysis}.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_several_workdirs_need_out(two_runs):
  res = _command("fourier", two_runs)
  assert res.returncode != 0 and "pass --out=DIR" in res.stderr


def test_bad_landscape_flags_fail_first_without_traceback(two_runs, tmp_path):
  argv = [sys.executable, "-m", "vitreg_jax.analysis.landscape", f"--workdir={two_runs[0]}",
          f"--out={tmp_path}", "--grid_points=1"]
  res = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode != 0 and "must be 0 (skip) or >= 2" in res.stderr
  assert "Traceback" not in res.stderr and not os.listdir(tmp_path)
