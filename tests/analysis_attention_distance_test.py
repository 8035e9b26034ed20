"""Mean attention distance and entropy: against Python loops on hand-made maps, on tiny models,
and the command end to end on a tiny embedded run."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import models
from vitreg_jax.analysis import attention_distance as ad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(attn, grid_hw, num_prefix):
  """Obviously correct: loops over images, heads, query and key patches."""
  gh, gw = grid_hw
  b_, h_ = attn.shape[:2]
  n = gh * gw
  distance, entropy = np.zeros((b_, h_)), np.zeros((b_, h_))
  for b in range(b_):
    for h in range(h_):
      for q in range(n):
        row = [attn[b, h, num_prefix + q, num_prefix + k] for k in range(n)]
        total = sum(row)
        d = e = 0.0
        for k in range(n):
          p = row[k] / total
          d += p * math.hypot(q // gw - k // gw, q % gw - k % gw)
          e -= p * math.log(p) if p > 0 else 0.0
        distance[b, h] += d / n
        entropy[b, h] += e / n
  return distance, entropy


def test_hand_made_maps_match_the_loop_reference():
  # 3 x 4 grid plus a CLS token; head 0 attends to itself only, head 1 uniformly (its CLS
  # column must be dropped and the row renormalized), head 2 random with exact zeros.
  gh, gw, prefix = 3, 4, 1
  t = prefix + gh * gw
  rng = np.random.default_rng(0)
  attn = np.zeros((2, 3, t, t))
  attn[:, 0] = np.eye(t)
  attn[:, 1] = 1.0 / t
  random = rng.random((2, t, t)) * (rng.random((2, t, t)) > 0.3)
  random[:, :, 1] += 0.1  # no all-zero patch row
  attn[:, 2] = random / random.sum(-1, keepdims=True)
  stats = ad.attention_statistics(attn, (gh, gw), prefix)
  distance, entropy = reference(attn, (gh, gw), prefix)
  np.testing.assert_allclose(stats["distance"], distance, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["entropy"], entropy, rtol=1e-5, atol=1e-6)
  # The two known cases: attending to oneself is distance 0 and entropy 0; uniform attention
  # is the grid's mean pairwise distance and log N.
  assert np.allclose(stats["distance"][:, 0], 0) and np.allclose(stats["entropy"][:, 0], 0)
  refs = ad.uniform_references((gh, gw))
  np.testing.assert_allclose(stats["distance"][:, 1], refs["uniform_distance"], rtol=1e-5)
  np.testing.assert_allclose(stats["entropy"][:, 1], math.log(gh * gw), rtol=1e-5)


def test_neighbour_attention_is_one_patch_away():
  # Every query attends to its right-hand neighbour (the last column to its left one).
  gh, gw = 2, 5
  n = gh * gw
  attn = np.zeros((1, 1, n, n))
  for q in range(n):
    attn[0, 0, q, q + 1 if q % gw < gw - 1 else q - 1] = 1.0
  stats = ad.attention_statistics(attn, (gh, gw))
  np.testing.assert_allclose(stats["distance"], 1.0)


@pytest.mark.parametrize("name", ["vit", "arvit"])
def test_per_block_averages_batches_exactly(name):
  model = models.create(name, 3, width=8, depth=2, num_heads=2, patch_size=4,
                        **({"mlp_dim": 8} if name == "vit" else {}))
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 12, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  split = ad.per_block(model, variables, [{"image": images[:1]}, {"image": images[1:]}])
  whole = ad.per_block(model, variables, [{"image": images}])
  assert [b["block"] for b in split] == [0, 1]
  for a, b in zip(split, whole):
    assert len(a["head_distance"]) == 2
    np.testing.assert_allclose(a["distance"], b["distance"], rtol=1e-5)
    np.testing.assert_allclose(a["head_entropy"], b["head_entropy"], rtol=1e-5)
    assert 0 < a["distance"] < ad.patch_distances((4, 3)).max()
  # The same figures as the reference on the model's own captured maps.
  _, out = model.apply(variables, images, capture_attention=True)
  gh, gw, prefix = model.token_layout((16, 12))
  distance, _ = reference(np.asarray(out["block1"]["attn"], np.float64), (gh, gw), prefix)
  np.testing.assert_allclose(whole[1]["distance"], distance.mean(), rtol=1e-4)


def test_command_writes_json_and_plot_for_overlaid_runs(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  config = "configs/arvit.py:variant=L1,dataset=embedded,runlocal"
  subprocess.run([sys.executable, "-m", "vitreg_jax.main", f"--config={config}",
                  f"--workdir={workdir}", "--config.total_steps=2",
                  "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2"],
                 cwd=ROOT, env=env, check=True, capture_output=True)
  out = tmp_path / "out"
  command = [sys.executable, "-m", "vitreg_jax.analysis.attention_distance",
             f"--workdir={workdir}", "--num_examples=16", "--batch_size=8"]
  done = subprocess.run(command + [f"--workdir={workdir}", f"--out={out}"], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads((out / "attention_distance.json").read_text())
  assert len(summary["runs"]) == 2 and (out / "attention_distance.png").stat().st_size > 0
  run = summary["runs"][0]
  assert run["grid"] == [8, 8] and run["num_prefix_tokens"] == 0 and run["split"] == "val"
  assert len(run["blocks"]) == 6 and len(run["blocks"][0]["head_distance"]) == 12
  assert run["max_entropy"] == pytest.approx(math.log(64))
  # A user's mistake is one line and exit status 1, no traceback.
  bad = subprocess.run(command[:3] + [f"--workdir={tmp_path / 'missing'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().startswith("error:")
