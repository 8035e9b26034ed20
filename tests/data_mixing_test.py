"""Mixup / CutMix: the recipe drawn from (seed, step) by the pipeline, applied on the device.
Each output is checked against a NumPy reading of the recipe (a blend, or one pasted box whose
area is 1 - lambda); targets sum to 1; the stream is deterministic, resumable and the same for
any number of processes."""

import jax
import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax.data import mixing
from vitreg_jax.training import steps

B, H, W, C, K = 6, 8, 10, 3, 5
_apply = jax.jit(lambda batch: mixing.apply(batch, K))  # compiled once for the file.


def _batch(seed, step=0, **recipe):
  rng = np.random.default_rng(seed)
  batch = {'image': rng.normal(size=(B, H, W, C)).astype(np.float32),
           'label': rng.integers(0, K, B).astype(np.int32)}
  mix = mixing.draw(mixing.check_config(recipe), seed, step, H, W)
  batch.update({k: np.broadcast_to(v, (B, *np.shape(v))).copy() for k, v in mix.items()})
  return batch, mix


def _reference_check(batch, mix, out, targets):
  """Checks `apply`'s output against the recipe in NumPy; returns the recipe's name."""
  x, lam = batch['image'], float(mix['mix_lam'])
  onehot = np.eye(K)[batch['label']]
  np.testing.assert_allclose(targets, lam * onehot + (1 - lam) * onehot[::-1], atol=1e-6)
  np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
  if lam == 1.0:
    np.testing.assert_array_equal(out, x)
    return 'none'
  if not mix['mix_cutmix']:
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], atol=1e-6)
    return 'mixup'
  top, bottom, left, right = mix['mix_box']
  expected = x.copy()
  expected[:, top:bottom, left:right] = x[::-1, top:bottom, left:right]
  np.testing.assert_array_equal(out, expected)
  assert lam == pytest.approx(1 - (bottom - top) * (right - left) / (H * W), abs=1e-6)
  return 'cutmix'


def test_every_recipe_is_applied_as_drawn():
  seen = []
  for step in range(24):
    batch, mix = _batch(0, step)
    out, targets = map(np.asarray, _apply(batch))
    assert out.shape == (B, H, W, C) and targets.shape == (B, K)
    seen.append(_reference_check(batch, mix, out, targets))
  assert {'mixup', 'cutmix'} <= set(seen)  # switch_prob 0.5: both appear in 24 steps.


def test_draw_is_a_pure_function_of_seed_and_step():
  a = [mixing.draw(mixing.DEFAULTS, 3, s, H, W) for s in range(20)]
  b = [mixing.draw(mixing.DEFAULTS, 3, s, H, W) for s in range(20)]
  c = [mixing.draw(mixing.DEFAULTS, 4, s, H, W) for s in range(20)]
  for u, v in zip(a, b):
    for k in u:
      np.testing.assert_array_equal(u[k], v[k])
  assert [float(m['mix_lam']) for m in a] != [float(m['mix_lam']) for m in c]
  assert len({float(m['mix_lam']) for m in a}) > 15 and all(0 <= m['mix_lam'] <= 1 for m in a)


@pytest.mark.parametrize('recipe,expected', [
    (dict(mixup_alpha=1.0, cutmix_alpha=0.0), {'mixup'}),
    (dict(mixup_alpha=0.0, cutmix_alpha=1.0), {'cutmix'}),
    (dict(prob=0.0), {'none'}),
])
def test_single_recipes_and_probability(recipe, expected):
  seen = set()
  for step in range(12):
    batch, mix = _batch(1, step, **recipe)
    seen.add(_reference_check(batch, mix, *map(np.asarray, _apply(batch))))
  # A CutMix box can be empty when lambda is drawn near 1 (then nothing is mixed).
  assert expected <= seen <= expected | {'none'}


def test_without_recipe_targets_are_one_hot_and_loss_takes_soft_targets():
  batch, _ = _batch(2)
  plain = {'image': batch['image'], 'label': batch['label']}
  images, targets = mixing.apply(plain, K)
  np.testing.assert_array_equal(images, plain['image'])
  np.testing.assert_array_equal(targets, np.eye(K)[plain['label']])
  logits = np.random.default_rng(0).normal(size=(B, K)).astype(np.float32)
  soft = np.random.default_rng(1).dirichlet(np.ones(K), B).astype(np.float32)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  smoothed = 0.9 * soft + 0.1 / K
  np.testing.assert_allclose(steps.soft_cross_entropy(logits, soft, 0.1),
                             -(smoothed * log_p).sum(1).mean(), rtol=1e-5)


def test_config_checks():
  assert mixing.check_config(None) is None
  assert mixing.check_config({'cutmix_alpha': 0.5})['mixup_alpha'] == 1.0
  with pytest.raises(ValueError, match=r"Unknown data.mixup option\(s\) \['alpha'\]"):
    mixing.check_config({'alpha': 1.0})
  with pytest.raises(ValueError, match='prob must be in'):
    mixing.check_config({'prob': 2.0})
  with pytest.raises(ValueError, match='data.mixup = None'):
    mixing.check_config({'mixup_alpha': 0.0, 'cutmix_alpha': 0.0})
  with pytest.raises(ValueError, match='Unknown data.mixup option'):
    data.open({'name': 'npz', 'path': 'unused', 'mixup': {'beta': 1}})


def test_pipeline_batches_carry_the_recipe_resumably_and_process_independently(tmp_path):
  path = tmp_path / 'toy.npz'
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8),
           labels=np.arange(10) % 3)
  config = dict(name='npz', path=str(path), num_threads=1, mixup=dict(cutmix_alpha=0.8))

  def stream(start=0, pi=0, pc=1, k=6):
    it = data.open(config).train_iterator(global_batch_size=4, seed=9, start_step=start,
                                          process_index=pi, process_count=pc)
    return [next(it) for _ in range(k)]

  full = stream()
  for step, b in enumerate(full):
    recipe = mixing.draw(config['mixup'], 9, step, 8, 8)
    for key in mixing.BATCH_KEYS:
      assert b[key].shape == (4, *np.shape(recipe[key]))
      np.testing.assert_array_equal(b[key], np.broadcast_to(recipe[key], b[key].shape))
  for a, b in zip(full[2:], stream(start=2, k=4)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for g, p0, p1 in zip(full, stream(pi=0, pc=2), stream(pi=1, pc=2)):
    for key in mixing.BATCH_KEYS:
      np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), g[key])
