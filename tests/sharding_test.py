"""Sharding tests: the same train step on 1 and 8 (simulated) devices, FSDP specs."""

import json
import os
import subprocess
import sys

import numpy as np
from jax.sharding import PartitionSpec as P

from vitreg_jax import sharding

HERE = os.path.dirname(__file__)


def test_fsdp_spec_splits_largest_divisible_dim():
  assert sharding.fsdp_spec((64, 96), 8, min_size=16) == P(None, "data")
  assert sharding.fsdp_spec((63, 96), 8, min_size=16) == P(None, "data")
  assert sharding.fsdp_spec((63, 9), 8, min_size=16) == P()  # Nothing divides.
  assert sharding.fsdp_spec((64,), 8, min_size=1000) == P()  # Too small to bother.
  assert sharding.fsdp_spec((64, 96), 1, min_size=16) == P()


def test_train_steps_on_8_devices_match_1_device_and_fsdp():
  # Added to the session's XLA_FLAGS (tests/conftest.py), not in place of them.
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, os.path.join(HERE, "workers", "sharded_step.py")],
                       env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert out["fsdp_sharded"], "FSDP run left every parameter replicated"
  # Loss decreases (the steps really train) and the runs agree to float32 round-off.
  assert out["losses_1"][-1] < out["losses_1"][0]
  np.testing.assert_allclose(out["losses_8"], out["losses_1"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["losses_fsdp"], out["losses_1"], rtol=1e-5, atol=1e-6)
  assert out["param_diff_8"] < 1e-5 and out["param_diff_fsdp"] < 1e-5, out
