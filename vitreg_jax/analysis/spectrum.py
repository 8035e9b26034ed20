r"""Eigenvalue solvers that only see a symmetric operator `v -> A v` on R^n.

* `power_iteration` (the PyHessian method the authors used, Yao et al. 2020): the top-k
  eigenvalues *in magnitude* (so large negative ones are found) by power iteration, deflating
  the eigenvectors already found by projecting them out of every iterate.
* `lanczos` / `lanczos_topk`: m-step Lanczos with full reorthogonalization and the k extreme
  Ritz values (fewer products for the same k; an option, not the paper's method).
* `slq`: stochastic Lanczos quadrature (Ghorbani et al. 2019): nodes and weights whose
  Gaussian-broadened sum (`density`) estimates the whole eigenvalue density.
* `hutchinson_trace`: tr(A) ~ mean of v^T A v over Rademacher vectors.

Memory. Full reorthogonalization keeps the Krylov basis, m x n numbers: for ViT-B (86 M
parameters) and 30 steps, 10 GB in fp32 on the accelerator, the growth with iterations x
parameters PyHessian users hit. `basis` chooses where it lives:
* `device` (default): fp32 on the device, one matrix product per reorthogonalization;
* `bf16`: on the device in bfloat16 (half the memory), projected out row by row in fp32 so no
  fp32 copy is made; orthogonality to ~3e-3 instead of ~1e-7 (Ritz values stay accurate to
  about that relative level; a converged eigenvalue may show up twice);
* `host`: in host RAM (NumPy, fp32); the loop runs in Python, and only the current vectors
  (O(n)) are on the device besides the operator's own memory.
Power iteration keeps its k deflation vectors (k x n) on the device in every mode.

A 0/1 `mask` (a parameter block, `operators.masked`) restricts every random start vector, so
the Krylov spaces, the quadrature and the trace are those of the block.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors

BASES = ("device", "bf16", "host")


def _random(kind: str, key, n: int, mask):
  v = (jax.random.normal(key, (n,)) if kind == "normal"
       else jax.random.rademacher(key, (n,), jnp.float32))
  return v if mask is None else v * mask


def _project_out(v, basis):
  """Removes from `v` its components along the rows of `basis` (zero rows are inert).

  fp32 rows: one matrix product. Narrower rows (bf16): row by row in fp32, so the basis is
  never copied to fp32."""
  if basis.dtype == jnp.float32:
    return v - basis.T @ (basis @ v)

  def body(i, v):
    row = basis[i].astype(jnp.float32)
    return v - jnp.vdot(row, v) * row
  return jax.lax.fori_loop(0, basis.shape[0], body, v)


def _normalize(v):
  return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)


def power_iteration(matvec: Callable, n: int, k: int, key, *, max_iter: int = 100,
                    tol: float = 1e-3, mask=None):
  """Top-k eigenpairs (largest |eigenvalue|) by power iteration with deflation (PyHessian).

  For i = 1..k: start from a random unit vector orthogonal to the i-1 eigenvectors found,
  repeat `v <- normalize(P A v)` (P projects out the found eigenvectors) and
  `lambda <- v^T A v` until `|lambda - lambda_prev| < tol * |lambda_prev|` or `max_iter`
  products.

  Returns:
    `(eigenvalues [k], eigenvectors [k, n], products [k])` (products: A v calls used).
  """
  def one(i, carry):
    vals, vecs, used = carry
    v = _normalize(_project_out(_random("normal", jax.random.fold_in(key, i), n, mask), vecs))

    def cond(c):
      it, _, lam, prev = c
      return (it < max_iter) & ((it < 2) | (jnp.abs(lam - prev) >= tol * jnp.abs(prev) + 1e-30))

    def body(c):
      it, v, lam, _ = c
      hv = _project_out(matvec(v), vecs)
      return it + 1, _normalize(hv), jnp.vdot(v, hv), lam

    it, v, lam, _ = jax.lax.while_loop(cond, body, (0, v, jnp.float32(0), jnp.float32(0)))
    return vals.at[i].set(lam), vecs.at[i].set(v), used.at[i].set(it)

  init = (jnp.zeros(k), jnp.zeros((k, n)), jnp.zeros(k, jnp.int32))
  return jax.lax.fori_loop(0, k, one, init)


def _lanczos_step(matvec, v, v_prev, b_prev):
  """The three-term part of one step: `(alpha, w)` with w = A v - b_prev v_prev - alpha v."""
  w = matvec(v) - b_prev * v_prev
  a = jnp.vdot(v, w)
  return a, w - a * v


def lanczos(matvec: Callable, v0, m: int, basis: str = "device"):
  """m steps of Lanczos with full reorthogonalization from `v0` (`basis`: see module doc).

  Returns:
    `(alpha [m], beta [m - 1])`: `T = tridiag(beta, alpha, beta) = V A V^T` for the
    orthonormal Krylov basis V. After an invariant subspace is exhausted (beta ~ 0) the
    remaining entries are zero and their Ritz values carry zero quadrature weight.
  """
  if basis not in BASES:
    raise errors.UserError(f"basis must be one of {BASES}, got {basis!r}.")
  if basis == "host":
    return _lanczos_host(matvec, v0, m)
  n = v0.shape[0]
  dtype = jnp.bfloat16 if basis == "bf16" else jnp.float32

  def step(j, carry):
    store, alpha, beta, v, v_prev, b_prev = carry
    store = store.at[j].set(v.astype(dtype))
    a, w = _lanczos_step(matvec, v, v_prev, b_prev)
    w = _project_out(_project_out(w, store), store)  # twice: classical GS is unstable
    b = jnp.linalg.norm(w)
    live = b > 1e-6 * jnp.maximum(jnp.abs(a), 1.0)
    v_next = jnp.where(live, w / jnp.where(live, b, 1.0), 0.0)
    b = jnp.where(live, b, 0.0)
    return store, alpha.at[j].set(a), beta.at[j].set(b), v_next, v, b

  init = (jnp.zeros((m, n), dtype), jnp.zeros(m), jnp.zeros(m), _normalize(v0), jnp.zeros(n),
          jnp.float32(0))
  _, alpha, beta, *_ = jax.lax.fori_loop(0, m, step, init)
  return alpha, beta[:-1]


def _lanczos_host(matvec: Callable, v0, m: int):
  """`lanczos` with the basis in host RAM: a Python loop; `matvec` should be jitted (the
  caller's, e.g. `functools.partial(jitted_op, theta, batch)`, so it compiles once)."""
  n = v0.shape[0]
  store = np.zeros((m, n), np.float32)
  alpha, beta = np.zeros(m, np.float32), np.zeros(m, np.float32)
  v, v_prev, b_prev = _normalize(jnp.asarray(v0, jnp.float32)), jnp.zeros(n), jnp.float32(0)
  for j in range(m):
    store[j] = np.asarray(v)
    a, w = _lanczos_step(matvec, v, v_prev, b_prev)
    w = np.asarray(w)
    for _ in range(2):  # twice: classical GS is unstable
      w = w - store[:j + 1].T @ (store[:j + 1] @ w)
    b = float(np.linalg.norm(w))
    alpha[j] = float(a)
    if not b > 1e-6 * max(abs(float(a)), 1.0):
      break
    beta[j] = b
    v_prev, v, b_prev = v, jnp.asarray(w / b), jnp.float32(b)
  return jnp.asarray(alpha), jnp.asarray(beta[:-1])


def _ritz(alpha, beta):
  t = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
  return jnp.linalg.eigh(t)


def lanczos_topk(matvec: Callable, n: int, k: int, key, *, steps: int = 30, mask=None,
                 basis: str = "device"):
  """The k Ritz values largest in magnitude after `steps` Lanczos steps (ordered by |.|)."""
  alpha, beta = lanczos(matvec, _random("normal", key, n, mask), min(steps, n), basis)
  theta, _ = _ritz(alpha, beta)
  order = jnp.argsort(-jnp.abs(theta))
  return theta[order[:k]]


def slq(matvec: Callable, n: int, key, *, num_vectors: int = 4, steps: int = 30, mask=None,
        basis: str = "device"):
  """Stochastic Lanczos quadrature: nodes and weights `[num_vectors, steps]`.

  For a Rademacher vector v, the Lanczos tridiagonal T of (A, v) gives
  `v^T f(A) v / |v|^2 ~ sum_i w_i f(theta_i)` with theta = eig(T) and w_i = (first component
  of the i-th eigenvector of T)^2 (exact for polynomials of degree < 2 steps). Each row of
  weights sums to 1.
  """
  def one(key):
    alpha, beta = lanczos(matvec, _random("rademacher", key, n, mask), min(steps, n), basis)
    theta, q = _ritz(alpha, beta)
    return theta, q[0] ** 2

  keys = jax.random.split(key, num_vectors)
  if basis == "host":
    nodes, weights = zip(*(one(k) for k in keys))
    return jnp.stack(nodes), jnp.stack(weights)
  return jax.lax.map(one, keys)


def density(nodes, weights, grid, sigma: float):
  """Gaussian-broadened SLQ density on `grid`, averaged over the random vectors."""
  nodes, weights, grid = (np.asarray(a, np.float64) for a in (nodes, weights, grid))
  z = (grid[:, None, None] - nodes[None]) / sigma
  kernel = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))
  return (kernel * weights[None]).sum(-1).mean(-1)


def hutchinson_trace(matvec: Callable, n: int, key, *, num_vectors: int = 4,
                     mask: Optional[jax.Array] = None):
  """tr(A) ~ mean_v v^T A v over Rademacher vectors (Hutchinson 1989)."""
  def one(key):
    v = _random("rademacher", key, n, mask)
    return jnp.vdot(v, matvec(v))
  return jax.lax.map(one, jax.random.split(key, num_vectors)).mean()
