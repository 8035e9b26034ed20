"""Tests of vitreg_jax.models.map_head: big_vision's multihead attention pooling."""

import flax.linen as nn
import jax
import numpy as np

from vitreg_jax.models import map_head


def _random(shapes, seed):
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.5, shapes)


def test_probe_attention_equals_flax_multihead_attention():
  """Same parameters, same outputs as flax's module, which big_vision's MAPHead calls."""
  q_in = np.random.RandomState(0).normal(size=(2, 1, 16)).astype(np.float32)
  kv_in = np.random.RandomState(1).normal(size=(2, 7, 16)).astype(np.float32)
  ours = map_head.ProbeAttention(num_heads=4)
  shapes = jax.eval_shape(ours.init, jax.random.key(0), q_in, kv_in)['params']
  params = _random(shapes, 2)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4)
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, jax.eval_shape(theirs.init, jax.random.key(0), q_in, kv_in)['params'])
  np.testing.assert_allclose(ours.apply({'params': params}, q_in, kv_in),
                             theirs.apply({'params': params}, q_in, kv_in), rtol=1e-5, atol=1e-5)


def test_map_pooling_ignores_token_order():
  x = np.random.RandomState(3).normal(size=(2, 9, 16)).astype(np.float32)
  head = map_head.MAPHead(num_heads=2, mlp_dim=32)
  params = _random(jax.eval_shape(head.init, jax.random.key(0), x)['params'], 4)
  pooled = head.apply({'params': params}, x)
  assert pooled.shape == (2, 16)
  perm = np.random.RandomState(5).permutation(9)
  np.testing.assert_allclose(head.apply({'params': params}, x[:, perm]), pooled, rtol=1e-5,
                             atol=1e-5)
  assert np.abs(pooled[0] - pooled[1]).max() > 1e-3  # Different inputs pool differently.
