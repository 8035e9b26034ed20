"""Hessian analysis maths against slow, obviously correct references.

Dense references (`jax.hessian`, `jax.jacobian`, `numpy.linalg.eigvalsh`) on an MLP and a
1-block ViT of ~250 parameters; the L2 terms' Hessians against autodiff and their closed
forms; solver checks on explicit matrices with known spectra; one command-line run of the
new options (the pair with and without L2 among them) on a tiny saved run.
"""

import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from testutil import np_init
from vitreg_jax import models
from vitreg_jax.analysis import hessian
from vitreg_jax.analysis import objective
from vitreg_jax.analysis import operators
from vitreg_jax.analysis import spectrum

TINY = {
    "vit": dict(width=4, depth=1, mlp_dim=4, num_heads=2, patch_size=4, head_zeroinit=False),
    "arvit": dict(width=4, depth=1, num_heads=2, patch_size=4),
    "resnet": dict(depth=18, width=2),
    "alternet": dict(blocks_per_stage=(1, 2), msa_per_stage=(0, 1), heads=(1, 1), head_dim=2,
                     msa_window=2, width=2),
}


class MLP(nn.Module):
  """A two-layer tanh MLP with the library's model interface (`(logits, out)`)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    h = nn.tanh(nn.Dense(8, name="hidden")(x.reshape(len(x), -1)))
    return nn.Dense(3, name="head")(h), {}


def _batch(key=1, size=6):
  x = jax.random.normal(jax.random.PRNGKey(key), (size, 4, 8, 1))
  return {"image": x, "label": jnp.arange(size) % 3}


def _objective(name, weight_decay=0.1, x=None, init=None, shift=0.0, **kwargs):
  """`init=np_init`: NumPy-filled variables of the right shapes (no JAX compilation), for
  tests that only trace the objective. `shift` moves every parameter (biases start at 0);
  `kwargs` go to `Objective` (`l2`, `decay_1d`)."""
  model = MLP() if name == "mlp" else models.create(name, 3, **TINY[name])
  x = _batch()["image"] if x is None else x
  variables = model.init(jax.random.PRNGKey(0), x) if init is None else init(model, x)
  if name == "mlp":  # away from zero, so the tanh's curvature is not negligible
    variables = jax.tree.map(lambda p: 2.0 * p, variables)
  variables = jax.tree.map(lambda p: p + shift, variables)
  return objective.Objective(model, variables, num_classes=3, weight_decay=weight_decay,
                             **kwargs)


@functools.lru_cache(maxsize=None)
def dense_hessian(name):
  """(objective, batch, exact Hessian by jax.hessian) of a tiny model, in fp64 NumPy."""
  # The squared L2 form these checks were calibrated on (the SLQ moments' probe count, a
  # negative eigenvalue among the ViT's top 2); the authors' form: test_l2_hessians_*.
  obj, batch = _objective(name, l2="squared"), _batch()
  h = jax.jit(jax.hessian(obj.loss))(obj.theta, batch)
  return obj, batch, np.asarray(h, np.float64)


def _top(w, k):
  return w[np.argsort(-np.abs(w))[:k]]


# ----------------------------------------------------------------------------- operators
@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_hvp_and_power_iteration_match_the_dense_hessian(name):
  obj, batch, h = dense_hessian(name)
  v = jax.random.normal(jax.random.PRNGKey(2), obj.theta.shape)
  matvec = functools.partial(operators.hvp, obj.loss, obj.theta, batch)
  hv = jax.jit(matvec)(v)
  np.testing.assert_allclose(hv, h @ v, rtol=1e-3, atol=1e-3 * np.abs(h @ v).max())
  vals, vecs, used = jax.jit(lambda: spectrum.power_iteration(
      matvec, obj.theta.size, 2, jax.random.PRNGKey(3), max_iter=3000, tol=1e-7))()
  expected = _top(np.linalg.eigvalsh((h + h.T) / 2), 2)
  np.testing.assert_allclose(vals, expected, rtol=1e-3)
  residual = vecs @ h - vals[:, None] * vecs
  assert np.linalg.norm(residual, axis=1).max() < 1e-2 * np.abs(expected).max()
  assert (used < 3000).all()


def test_the_vit_check_covers_a_negative_eigenvalue():
  _, _, h = dense_hessian("vit")
  assert (_top(np.linalg.eigvalsh(h), 2) < 0).any()


@pytest.mark.parametrize("name,regex", [("mlp", "^hidden/"), ("vit", "MlpBlock_0"),
                                        ("vit", "Attention")])
def test_subset_hessian_is_the_exact_block_of_jax_hessian(name, regex):
  obj, batch, h = dense_hessian(name)
  idx = np.flatnonzero(np.asarray(obj.mask(regex)))
  block = h[np.ix_(idx, idx)]
  sub = obj.restrict(regex)  # --params: the vector itself restricted
  got = jax.jit(lambda: operators.dense(
      functools.partial(operators.hvp, sub.loss, sub.theta, batch), sub.theta.size))()
  # The restricted vector orders the selected leaves as the full one does.
  np.testing.assert_allclose(got, block, rtol=1e-3, atol=1e-4 * np.abs(block).max())
  mask = obj.mask(regex)  # --per_block: P H P on the full vector
  pmat = jax.jit(lambda: operators.dense(operators.masked(
      functools.partial(operators.hvp, obj.loss, obj.theta, batch), mask), obj.theta.size))()
  np.testing.assert_allclose(np.asarray(pmat)[np.ix_(idx, idx)], block, rtol=1e-3,
                             atol=1e-4 * np.abs(block).max())
  assert np.abs(np.delete(np.asarray(pmat), idx, axis=0)).max() == 0
  top = jax.jit(lambda: spectrum.power_iteration(
      operators.masked(functools.partial(operators.hvp, obj.loss, obj.theta, batch), mask),
      obj.theta.size, 2, jax.random.PRNGKey(4), max_iter=3000, tol=1e-7, mask=mask)[0])()
  np.testing.assert_allclose(top, _top(np.linalg.eigvalsh(block), 2), rtol=1e-3)


def _l2_objectives(name):
  """The tiny model's objective with each L2 form, parameters moved off zero (biases start
  at 0, where the authors' term has no curvature) and a large wd (visible curvature); the
  squared form over every parameter (`decay_1d`)."""
  base = _objective(name, weight_decay=0.3, shift=0.1)
  objs = {form: base.with_l2(form) for form in objective.L2_FORMS}
  objs["squared"] = _objective(name, weight_decay=0.3, shift=0.1, l2="squared", decay_1d=True)
  return objs


def _dense_hvp(obj, batch, loss=None):
  return np.asarray(jax.jit(lambda: operators.dense(functools.partial(
      operators.hvp, loss or obj.loss, obj.theta, batch), obj.theta.size))(), np.float64)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_l2_hessians_authors_form_and_squared_form(name):
  objs, batch = _l2_objectives(name), _batch()
  authors, none = objs["authors"], objs["none"]
  # The authors' term through the analyses' HVP equals the dense autodiff Hessian ...
  h_pen = _dense_hvp(authors, batch, lambda t, _: authors.penalty(t))
  np.testing.assert_allclose(h_pen, jax.jit(jax.hessian(authors.penalty))(authors.theta),
                             rtol=1e-4, atol=1e-6)
  # ... and the closed form, per tensor wd (I - u u^T) / |w|, zero between tensors.
  theta, expected = np.asarray(authors.theta, np.float64), np.zeros_like(h_pen)
  for param in authors.names:
    idx = np.flatnonzero(np.asarray(authors.mask("^" + re.escape(param) + "$")))
    w = theta[idx]
    u = w / np.linalg.norm(w)
    expected[np.ix_(idx, idx)] = 0.3 * (np.eye(len(idx)) - np.outer(u, u)) / np.linalg.norm(w)
  np.testing.assert_allclose(h_pen, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
  # The objective's Hessian is the NLL's plus that term (test_hvp_and_power_iteration checks
  # the whole loss's HVP against jax.hessian too, at the unshifted parameters).
  h_none, h_authors = _dense_hvp(none, batch), _dense_hvp(authors, batch)
  if name == "mlp":  # the dense autodiff Hessian of the whole objective (cheap here)
    np.testing.assert_allclose(h_authors, jax.jit(jax.hessian(authors.loss))(
        authors.theta, batch), rtol=1e-3, atol=1e-4 * np.abs(h_authors).max())
  np.testing.assert_allclose(h_authors - h_none, expected, rtol=0,
                             atol=1e-5 * np.abs(h_none).max())
  # The squared form over every parameter (decay_1d) adds exactly wd * I: every eigenvalue
  # moves up by wd, so negative ones smaller than wd disappear.
  h_squared = _dense_hvp(objs["squared"], batch)
  np.testing.assert_allclose(h_squared - h_none, 0.3 * np.eye(len(h_none)), rtol=0,
                             atol=1e-5 * np.abs(h_none).max())
  np.testing.assert_allclose(np.linalg.eigvalsh((h_squared + h_squared.T) / 2),
                             np.linalg.eigvalsh((h_none + h_none.T) / 2) + 0.3, rtol=0,
                             atol=1e-4 * np.abs(h_none).max())


def test_dataset_hessian_is_the_mean_of_batch_hessians_and_of_the_pooled_loss():
  obj = _objective("mlp")
  batches = [_batch(key=k) for k in (1, 2, 3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  matvec = operators.batch_operator(obj, "hessian")
  n = obj.theta.size
  got = jax.jit(lambda: operators.dense(
      functools.partial(operators.over_dataset(matvec), obj.theta, stacked), n))()
  exact = jax.jit(jax.hessian(obj.loss))  # one compilation for the three batches
  per_batch = [exact(obj.theta, b) for b in batches]
  np.testing.assert_allclose(got, np.mean(per_batch, axis=0), rtol=1e-4, atol=1e-6)
  pooled = {k: jnp.concatenate([b[k] for b in batches]) for k in batches[0]}
  np.testing.assert_allclose(got, jax.jit(jax.hessian(obj.loss))(obj.theta, pooled),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_ggn_is_jt_hout_j_and_positive_semidefinite(name):
  obj, batch, _ = dense_hessian(name)
  n = obj.theta.size
  got = np.asarray(jax.jit(lambda: operators.dense(
      functools.partial(operators.ggn_vp, obj, obj.theta, batch), n))(), np.float64)
  images, targets = obj.inputs(batch)
  logits = obj.logits(obj.theta, images)
  # The references jitted (op by op, the ViT's Jacobian takes a minute); still dense.
  jac = np.asarray(jax.jit(jax.jacobian(obj.logits))(obj.theta, images),
                   np.float64).reshape(-1, n)
  h_out = np.asarray(jax.jit(jax.hessian(lambda z: obj.data_loss(z, targets)))(logits),
                     np.float64).reshape(jac.shape[0], jac.shape[0])
  expected = jac.T @ h_out @ jac + np.asarray(jax.jit(jax.hessian(obj.penalty))(obj.theta))
  np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
  w = np.linalg.eigvalsh((got + got.T) / 2)
  assert w.min() > -1e-5 * w.max(), w[:3]


# ----------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_hutchinson_is_within_three_standard_errors(name):
  obj, batch, h = dense_hessian(name)
  count = 200
  est = jax.jit(lambda: spectrum.hutchinson_trace(
      functools.partial(operators.hvp, obj.loss, obj.theta, batch), obj.theta.size,
      jax.random.PRNGKey(6), num_vectors=count))()
  off = h - np.diag(np.diag(h))
  se = np.sqrt(2 * (off**2).sum() / count)  # Var(v^T H v) = 2 sum_{i != j} H_ij^2
  assert abs(float(est) - np.trace(h)) < 3 * se, (float(est), np.trace(h), se)


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_slq_first_two_moments_within_five_percent(name):
  """12000 probe vectors: 3 standard errors of both moments are below 5% on these models
  (4900-6900 vectors would be needed; each vector's quadrature is exact for degree < 16)."""
  obj, batch, h = dense_hessian(name)
  n = obj.theta.size
  op = functools.partial(operators.hvp, obj.loss, obj.theta, batch)
  keys = jax.random.split(jax.random.PRNGKey(8), 12000)
  nodes, weights = map(np.asarray, jax.jit(jax.vmap(
      lambda k: spectrum.slq(op, n, k, num_vectors=1, steps=8)))(keys))
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-3)
  w = np.linalg.eigvalsh(h)
  for p in (1, 2):
    est, exact = (weights * nodes.astype(np.float64)**p).sum(-1).mean(), np.mean(w**p)
    assert abs(est - exact) < 0.05 * abs(exact), (p, est, exact)


@pytest.mark.parametrize("basis", ["bf16", "host"])
def test_slq_in_every_basis_matches_the_device_basis(basis):
  obj, batch, _ = dense_hessian("vit")
  op = jax.jit(functools.partial(operators.hvp, obj.loss, obj.theta, batch))
  run = lambda b: spectrum.slq(op, obj.theta.size, jax.random.PRNGKey(8), num_vectors=4,
                               steps=20, basis=b)
  ref = [np.asarray(a, np.float64) for a in jax.jit(lambda: run("device"))()]
  got = [np.asarray(a, np.float64) for a in (run(basis) if basis == "host"
                                             else jax.jit(lambda: run(basis))())]
  for p in (1, 2):  # each vector's quadrature moments v^T H^p v / |v|^2 (fp32 sums)
    expected = (ref[1] * ref[0]**p).sum(-1)
    np.testing.assert_allclose((got[1] * got[0]**p).sum(-1), expected, rtol=0,
                               atol=(1e-3 if basis == "host" else 1e-2) * np.abs(expected).max())


@pytest.mark.parametrize("basis", ["device", "bf16", "host"])
def test_lanczos_topk_of_the_vit_hessian_in_every_basis(basis):
  obj, batch, h = dense_hessian("vit")
  op = jax.jit(functools.partial(operators.hvp, obj.loss, obj.theta, batch))
  run = lambda: spectrum.lanczos_topk(op, obj.theta.size, 3, jax.random.PRNGKey(9),
                                      steps=80, basis=basis)
  top = np.asarray(run() if basis == "host" else jax.jit(run)())
  expected = _top(np.linalg.eigvalsh(h), 3)
  np.testing.assert_allclose(top, expected, rtol=1e-3 if basis != "bf16" else 1e-2)


def _known_matrix(spectrum_values, seed=0):
  n = len(spectrum_values)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return jnp.asarray((q * np.asarray(spectrum_values)) @ q.T, jnp.float32)


TOP = [10.0, -7.0, 5.0, -3.0]


def test_power_iteration_and_lanczos_on_a_known_matrix():
  values = np.concatenate([TOP, np.random.default_rng(1).uniform(-1, 1, 36)])
  a = _known_matrix(values)
  vals, vecs, _ = spectrum.power_iteration(lambda v: a @ v, 40, 4, jax.random.PRNGKey(0),
                                           max_iter=2000, tol=1e-7)
  np.testing.assert_allclose(vals, TOP, rtol=1e-3)
  np.testing.assert_allclose(np.abs(vecs @ vecs.T), np.eye(4), atol=1e-3)
  for basis in spectrum.BASES:
    top = spectrum.lanczos_topk(lambda v: a @ v, 40, 4, jax.random.PRNGKey(0), steps=30,
                                basis=basis)
    np.testing.assert_allclose(top, TOP, rtol=1e-3 if basis != "bf16" else 1e-2)


def test_slq_density_integrates_to_one():
  a = _known_matrix(np.concatenate([TOP, np.linspace(-1, 1, 56)]))
  nodes, weights = spectrum.slq(lambda v: a @ v, 60, jax.random.PRNGKey(5), num_vectors=16,
                                steps=20)
  grid = np.linspace(-15, 15, 6001)
  dens = spectrum.density(nodes, weights, grid, sigma=0.1)
  assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-3
  assert dens[np.argmin(np.abs(grid - 10.0))] > dens[np.argmin(np.abs(grid - 8.5))]


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_family_has_both_operators_and_blocks(name):
  obj = _objective(name, init=np_init)  # shapes only: the operators are traced, not run
  for op in operators.OPERATORS:
    out = jax.eval_shape(operators.batch_operator(obj, op), obj.theta, _batch(), obj.theta)
    assert out.shape == obj.theta.shape and out.dtype == jnp.float32
  kinds = {b[1] for b in objective.param_blocks(obj.names)}
  assert kinds == {"resnet": {"conv"}, "alternet": {"conv", "msa"}}.get(name, {"msa", "mlp"})


def test_bad_options_are_rejected_before_compute():
  obj = _objective("mlp")
  matvec = operators.batch_operator(obj)
  with pytest.raises(ValueError, match="top_k"):
    hessian.make_batch_analysis(matvec, obj.theta.size, top_k=0)
  with pytest.raises(ValueError, match="method"):
    hessian.make_batch_analysis(matvec, obj.theta.size, top_k=2, method="arnoldi")
  with pytest.raises(ValueError, match="basis"):
    hessian.make_batch_analysis(matvec, obj.theta.size, top_k=2, basis="disk")
  with pytest.raises(ValueError, match="operator"):
    operators.batch_operator(obj, "fisher")


# ----------------------------------------------------------------------------- command line
def _command(*args):
  argv = [sys.executable, "-m", "vitreg_jax.analysis.hessian", *args]
  return subprocess.run(argv, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def mixup_run(tmp_path_factory):
  """A tiny ViT run trained (in its config) with Mixup/CutMix, smoothing and weight decay."""
  import testutil  # pylint: disable=g-import-not-at-top
  data = dict(name="dominoes", num_train=64, num_val=32, num_test=32, eval_splits=("val_id",),
              mixup=dict(mixup_alpha=1.0, cutmix_alpha=0.8))
  return testutil.make_run_dir(
      tmp_path_factory.mktemp("run") / "vit", "vit",
      dict(width=8, depth=2, num_heads=2, mlp_dim=8, patch_size=8), data, steps=(1, 2),
      label_smoothing=0.1, optimizer=dict(name="adamw", lr=1e-3, weight_decay=0.05))


def test_command_with_every_new_option(mixup_run, tmp_path):
  res = _command(f"--workdir={mixup_run}", "--step=1", "--step=2", f"--out={tmp_path}",
                 "--per_block", "--over=batch", "--over=dataset", "--operator=ggn",
                 "--basis=host", "--method=lanczos", "--lanczos_steps=6", "--density",
                 "--num_batches=2", "--top_k=2", "--batch_size=8", "--num_vectors=2")
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.load(open(tmp_path / "hessian.json"))
  assert [r["step"] for r in result["runs"]] == [1, 2]
  for r in result["runs"]:
    assert r["operator"] == "ggn" and r["mixup"] and r["label_smoothing"] == 0.1
    assert r["l2"] == "authors" and r["objective"] == "CE + 0.05 * sum_t ||w_t||_2"
    bare = r["without_l2"]  # the pair: the same figures without the L2 term
    assert bare["objective"] == "CE (no L2)" and np.shape(bare["eigenvalues"]) == (2, 2)
    assert len(bare["blocks"]) == 4 and "density" in bare and "dataset" in bare
    for b, b0 in zip(r["blocks"], bare["blocks"]):  # same random vectors, PSD L2 Hessian
      assert np.all(np.asarray(b["trace"]) >= np.asarray(b0["trace"]) - 1e-6), (b, b0)
      assert np.any(np.asarray(b["trace"]) > np.asarray(b0["trace"])), (b, b0)
    assert np.shape(r["eigenvalues"]) == (2, 2) and len(r["dataset"]["eigenvalues"]) == 2
    assert r["dataset"]["num_examples"] == 16 and "density" in r
    assert [b["label"] for b in r["blocks"]] == ["block0/msa", "block0/mlp", "block1/msa",
                                                 "block1/mlp"]
    for b in r["blocks"]:  # GGN: PSD, so its top eigenvalues and traces are >= 0
      assert np.min(b["eigenvalues"]) > -1e-4 and np.min(b["trace"]) > -1e-4, b
      assert b["num_params"] < r["num_params"] and len(b["dataset"]["eigenvalues"]) == 2
  for name in ("hessian.png", "hessian_steps.png", "hessian_blocks.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "block1/mlp" in res.stdout


@pytest.mark.parametrize("flags,message", [
    (["--params=no_such_layer"], "matches none"),
    (["--per_block", "--params=Mlp"], "drop --params"),
])
def test_command_rejects_bad_options_before_compute(mixup_run, tmp_path, flags, message):
  res = _command(f"--workdir={mixup_run}", f"--out={tmp_path}", *flags)
  assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
  assert "Traceback" not in res.stderr
