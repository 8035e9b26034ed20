"""Hessian analysis maths against dense references (tiny models; seconds on a CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import models
from vitreg_jax.analysis import hessian


@functools.lru_cache(maxsize=None)
def tiny_problem(name="vit"):
  """A tiny model, a batch, the objective, its parameters and its dense Hessian."""
  if name == "vit":
    model = models.create("vit", 3, width=4, depth=1, mlp_dim=4, num_heads=2, patch_size=4,
                          head_zeroinit=False)
  else:
    model = models.create("resnet", 3, depth=18, width=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 8, 1))
  batch = {"image": x, "label": jnp.array([0, 1, 2, 0, 1, 2])}
  variables = model.init(jax.random.PRNGKey(0), x)
  loss, theta = hessian.make_objective(model, variables, weight_decay=0.1)
  dense = hessian.dense_hessian(loss, theta, batch)
  return loss, theta, batch, np.asarray(dense, np.float64)


def test_hvp_equals_dense_hessian_times_v():
  loss, theta, batch, dense = tiny_problem()
  v = jax.random.normal(jax.random.PRNGKey(2), theta.shape)
  hv = jax.jit(hessian.hvp, static_argnums=0)(loss, theta, batch, v)
  np.testing.assert_allclose(hv, dense @ np.asarray(v), rtol=2e-3,
                             atol=2e-3 * np.abs(dense @ np.asarray(v)).max())


def test_l2_penalty_adds_weight_decay_on_kernels_only():
  loss, theta, batch, dense = tiny_problem()
  model = models.create("vit", 3, width=4, depth=1, mlp_dim=4, num_heads=2, patch_size=4,
                        head_zeroinit=False)
  variables = model.init(jax.random.PRNGKey(0), batch["image"])
  loss0, _ = hessian.make_objective(model, variables, weight_decay=0.0)
  diff = np.asarray(dense - hessian.dense_hessian(loss0, theta, batch))
  mask = jax.flatten_util.ravel_pytree(
      jax.tree.map(lambda p: jnp.full(p.shape, float(p.ndim >= 2)), variables["params"]))[0]
  np.testing.assert_allclose(diff, 0.1 * np.diag(np.asarray(mask)), atol=1e-3)


def _top_by_magnitude(dense, k):
  w = np.linalg.eigvalsh(dense)
  return w[np.argsort(-np.abs(w))[:k]]


def test_power_iteration_matches_eigh_including_negative():
  loss, theta, batch, dense = tiny_problem()
  k = 4
  expected = _top_by_magnitude(dense, k)
  assert (expected < 0).any(), expected  # the test must cover a negative eigenvalue
  mv = jax.jit(functools.partial(hessian.hvp, loss, theta, batch))
  vals, vecs, used = hessian.power_iteration(mv, theta.size, k, jax.random.PRNGKey(3),
                                             max_iter=3000, tol=1e-7)
  np.testing.assert_allclose(vals, expected, rtol=1e-2)
  residual = np.asarray(vecs) @ dense - np.asarray(vals)[:, None] * np.asarray(vecs)
  assert np.linalg.norm(residual, axis=1).max() < 0.05 * abs(expected).max()
  assert (np.asarray(used) < 3000).all()


def test_power_iteration_on_a_known_matrix():
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  spectrum = np.concatenate([[10.0, -7.0, 5.0, -3.0], rng.uniform(-1, 1, 36)])
  a = jnp.asarray((q * spectrum) @ q.T, jnp.float32)
  vals, _, _ = hessian.power_iteration(lambda v: a @ v, 40, 4, jax.random.PRNGKey(0),
                                       max_iter=2000, tol=1e-7)
  np.testing.assert_allclose(vals, [10.0, -7.0, 5.0, -3.0], rtol=1e-3)
  top = hessian.lanczos_topk(lambda v: a @ v, 40, 4, jax.random.PRNGKey(0), steps=30)
  np.testing.assert_allclose(top, [10.0, -7.0, 5.0, -3.0], rtol=1e-3)


def test_lanczos_topk_matches_eigh_on_model():
  loss, theta, batch, dense = tiny_problem()
  mv = jax.jit(functools.partial(hessian.hvp, loss, theta, batch))
  top = hessian.lanczos_topk(mv, theta.size, 3, jax.random.PRNGKey(4), steps=80)
  np.testing.assert_allclose(top, _top_by_magnitude(dense, 3), rtol=1e-2)


def test_slq_density_integrates_to_one_and_matches_moments():
  loss, theta, batch, dense = tiny_problem()
  n = theta.size
  mv = jax.jit(functools.partial(hessian.hvp, loss, theta, batch))
  key = jax.random.PRNGKey(5)
  nodes, weights = hessian.slq(mv, n, key, num_vectors=8, steps=40)
  nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-4)
  # Quadrature is exact for moments of degree < 2 * steps: v^T H^p v / |v|^2, same vectors.
  vs = np.asarray(jax.vmap(lambda k: jax.random.rademacher(k, (n,), jnp.float32))(
      jax.random.split(key, 8)), np.float64)
  scale = np.abs(np.linalg.eigvalsh(dense)).max()
  for p in (1, 2, 3):
    exact = np.einsum("vi,ij,vj->v", vs, np.linalg.matrix_power(dense / scale, p), vs) / n
    np.testing.assert_allclose((weights * (nodes / scale) ** p).sum(-1), exact, atol=2e-3)
  # And the average estimates the dense spectrum's moments tr(H^p) / n.
  w = np.linalg.eigvalsh(dense) / scale
  for p in (1, 2):
    est = (weights * (nodes / scale) ** p).sum(-1).mean()
    assert abs(est - np.mean(w**p)) < 0.5 * np.mean(np.abs(w) ** p) + 1e-3, (p, est)
  lo, hi = nodes.min(), nodes.max()
  grid = np.linspace(lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo), 4000)
  dens = hessian.density(nodes, weights, grid, sigma=0.01 * (hi - lo))
  assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-3


def test_hutchinson_trace_is_unbiased():
  loss, theta, batch, dense = tiny_problem()
  mv = jax.jit(functools.partial(hessian.hvp, loss, theta, batch))
  est = hessian.hutchinson_trace(mv, theta.size, jax.random.PRNGKey(6), num_vectors=64)
  # Var of one Rademacher sample is 2 * sum_{i != j} H_ij^2.
  off = dense - np.diag(np.diag(dense))
  sd = np.sqrt(2 * (off**2).sum() / 64)
  assert abs(float(est) - np.trace(dense)) < 4 * sd + 1e-3


def test_batchnorm_models_use_frozen_statistics():
  loss, theta, batch, dense = tiny_problem("resnet")
  np.testing.assert_allclose(dense, dense.T, atol=1e-3 * np.abs(dense).max())
  mv = jax.jit(functools.partial(hessian.hvp, loss, theta, batch))
  v = jax.random.normal(jax.random.PRNGKey(7), theta.shape)
  np.testing.assert_allclose(mv(v), dense @ np.asarray(v), rtol=1e-2,
                             atol=1e-3 * np.abs(dense @ np.asarray(v)).max())


def test_bad_top_k_is_rejected_before_compute():
  loss, theta, _, _ = tiny_problem()
  with pytest.raises(ValueError, match="top_k"):
    hessian.make_batch_analysis(loss, theta.size, top_k=0)
  with pytest.raises(ValueError, match="method"):
    hessian.make_batch_analysis(loss, theta.size, top_k=2, method="arnoldi")
