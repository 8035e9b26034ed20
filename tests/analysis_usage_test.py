"""Every analysis command answers a missing or wrong --workdir with one message, no traceback."""

import subprocess
import sys

import pytest


# Every analysis's __main__ goes through runs.usage_errors; three commands check the wrapper.
@pytest.mark.parametrize("name, args, message", [
    ("landscape", [], "Pass at least one --workdir=DIR"),
    ("hessian", ["--workdir=/nonexistent/run"], "is not a vitreg_jax run directory"),
    ("calibration", ["--workdir=/nonexistent/run"], "is not a vitreg_jax run directory"),
])
def test_bad_workdir_is_one_message(name, args, message):
  proc = subprocess.run([sys.executable, "-m", f"vitreg_jax.analysis.{name}", *args],
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0, name
  assert message in proc.stderr, (name, proc.stderr[-500:])
  assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
