"""Hessian analysis maths against dense references.

The model checks compile one function (reference `jax.hessian`, the forward-over-reverse HVP
and power iteration together) on a ~250-parameter ViT; the solver checks use explicit
matrices with known spectra, so the file stays fast on a loaded CPU.
"""

import functools

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import models
from vitreg_jax.analysis import hessian

TINY = {
    "vit": dict(width=4, depth=1, mlp_dim=4, num_heads=2, patch_size=4, head_zeroinit=False),
    "arvit": dict(width=4, depth=1, num_heads=2, patch_size=4),
    "resnet": dict(depth=18, width=2),
    "alternet": dict(blocks_per_stage=(1, 2), msa_per_stage=(0, 1), heads=(1, 1), head_dim=2, msa_window=2,
                     width=2),
}


def _problem(name, weight_decay=0.1):
  model = models.create(name, 3, **TINY[name])
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 8, 1))
  batch = {"image": x, "label": jnp.array([0, 1, 2, 0, 1, 2])}
  variables = model.init(jax.random.PRNGKey(0), x)
  loss, theta = hessian.make_objective(model, variables, weight_decay=weight_decay)
  return model, variables, loss, theta, batch


@functools.lru_cache(maxsize=None)
def vit_results():
  """Dense Hessian (jax.hessian), H v by the HVP, and the top-2 by power iteration."""
  _, variables, loss, theta, batch = _problem("vit")
  v = jax.random.normal(jax.random.PRNGKey(2), theta.shape)

  @jax.jit
  def run(theta, batch, v):
    mv = functools.partial(hessian.hvp, loss, theta, batch)
    vals, vecs, used = hessian.power_iteration(mv, theta.size, 2, jax.random.PRNGKey(3),
                                               max_iter=2000, tol=1e-7)
    return jax.hessian(loss)(theta, batch), mv(v), vals, vecs, used

  dense, hv, vals, vecs, used = jax.device_get(run(theta, batch, v))
  return variables, np.asarray(dense, np.float64), np.asarray(v), hv, vals, vecs, used


def test_hvp_equals_dense_hessian_times_v():
  _, dense, v, hv, *_ = vit_results()
  expected = dense @ v
  np.testing.assert_allclose(hv, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_power_iteration_matches_eigh_of_dense_hessian_including_negative():
  _, dense, _, _, vals, vecs, used = vit_results()
  w = np.linalg.eigvalsh((dense + dense.T) / 2)
  expected = w[np.argsort(-np.abs(w))[:2]]
  assert (expected < 0).any(), expected  # the check must cover a negative eigenvalue
  np.testing.assert_allclose(vals, expected, rtol=1e-3)
  residual = vecs @ dense - vals[:, None] * vecs
  assert np.linalg.norm(residual, axis=1).max() < 1e-2 * np.abs(expected).max()
  assert (used < 2000).all()


def test_l2_penalty_is_weight_decay_on_kernels():
  variables, dense, *_ = vit_results()
  params = variables["params"]
  penalty_hessian = jax.hessian(
      lambda t: hessian.l2_penalty(ravel_pytree(params)[1](t), 0.1))(ravel_pytree(params)[0])
  mask = ravel_pytree(jax.tree.map(lambda p: jnp.full(p.shape, float(p.ndim >= 2)), params))[0]
  np.testing.assert_allclose(penalty_hessian, 0.1 * np.diag(mask), atol=1e-7)


def _known_matrix(spectrum, seed=0):
  n = len(spectrum)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return jnp.asarray((q * np.asarray(spectrum)) @ q.T, jnp.float32)


TOP = [10.0, -7.0, 5.0, -3.0]


def _spectrum(n=40):
  return np.concatenate([TOP, np.random.default_rng(1).uniform(-1, 1, n - len(TOP))])


def test_power_iteration_and_lanczos_on_a_known_matrix():
  a = _known_matrix(_spectrum())
  vals, vecs, _ = hessian.power_iteration(lambda v: a @ v, 40, 4, jax.random.PRNGKey(0),
                                          max_iter=2000, tol=1e-7)
  np.testing.assert_allclose(vals, TOP, rtol=1e-3)
  np.testing.assert_allclose(np.abs(vecs @ vecs.T), np.eye(4), atol=1e-3)
  top = hessian.lanczos_topk(lambda v: a @ v, 40, 4, jax.random.PRNGKey(0), steps=30)
  np.testing.assert_allclose(top, TOP, rtol=1e-3)


def test_slq_density_integrates_to_one_and_matches_moments():
  spectrum = _spectrum(60)
  a = _known_matrix(spectrum)
  key = jax.random.PRNGKey(5)
  nodes, weights = map(np.asarray, hessian.slq(lambda v: a @ v, 60, key, num_vectors=16,
                                               steps=20))
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-4)
  # Gauss quadrature is exact for degree < 2 * steps: v^T A^p v / |v|^2 for the same vectors.
  vs = np.asarray(jax.vmap(lambda k: jax.random.rademacher(k, (60,), jnp.float32))(
      jax.random.split(key, 16)), np.float64)
  dense = np.asarray(a, np.float64)
  for p in (1, 2, 3, 4):
    exact = np.einsum("vi,ij,vj->v", vs, np.linalg.matrix_power(dense, p), vs) / 60
    np.testing.assert_allclose((weights * nodes**p).sum(-1), exact, rtol=1e-3, atol=1e-3)
  # Averaged over vectors they estimate the spectrum's moments tr(A^p) / n.
  for p in (1, 2):
    est = (weights * nodes**p).sum(-1).mean()
    assert abs(est - np.mean(spectrum**p)) < 0.25 * np.mean(np.abs(spectrum)**p), (p, est)
  grid = np.linspace(-15, 15, 6001)
  dens = hessian.density(nodes, weights, grid, sigma=0.1)
  assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-3
  assert dens[np.argmin(np.abs(grid - 10.0))] > dens[np.argmin(np.abs(grid - 8.5))]


def test_hutchinson_trace_is_unbiased():
  spectrum = _spectrum(40)
  a = _known_matrix(spectrum)
  est = hessian.hutchinson_trace(lambda v: a @ v, 40, jax.random.PRNGKey(6), num_vectors=256)
  off = np.asarray(a, np.float64) - np.diag(np.diag(a))
  sd = np.sqrt(2 * (off**2).sum() / 256)
  assert abs(float(est) - spectrum.sum()) < 4 * sd


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_family_has_a_hessian_vector_product(name):
  _, _, loss, theta, batch = _problem(name)
  out = jax.eval_shape(functools.partial(hessian.hvp, loss), theta, batch, theta)
  assert out.shape == theta.shape and out.dtype == jnp.float32


def test_bad_options_are_rejected_before_compute():
  _, _, loss, theta, _ = _problem("resnet")
  with pytest.raises(ValueError, match="top_k"):
    hessian.make_batch_analysis(loss, theta.size, top_k=0)
  with pytest.raises(ValueError, match="method"):
    hessian.make_batch_analysis(loss, theta.size, top_k=2, method="arnoldi")
