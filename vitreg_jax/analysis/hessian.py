r"""Hessian eigenvalue spectra ("How do ViTs work?", Section 2, Fig. 1c and 4).

The objective the paper analyses is the training loss: the NLL on training batches (with the
training augmentation) plus the L2 weight penalty `wd / 2 * sum w^2` (its gradient is the
coupled weight decay `wd * w`; `wd` is the run's `optimizer.weight_decay`, on the parameters
the optimizer decays: kernels and embeddings, or every parameter with `decay_1d_params`).
Parameters are fp32 and the model runs in inference mode: BatchNorm uses its frozen running
statistics, dropout is off.

Hessian-vector products are forward-over-reverse, `Hv = jvp(grad L, (w,), (v,))`, on the
flattened parameter vector. The spectrum methods only see the map `v -> Hv`:

* `power_iteration` (the PyHessian method the authors used, Yao et al. 2020): the top-k
  eigenvalues *in magnitude* (so large negative ones are found) by power iteration, deflating
  the eigenvectors already found by projecting them out of every iterate.
* `lanczos_topk`: k extreme Ritz values of an m-step Lanczos with full reorthogonalization
  (fewer products for the same k; an option, not the paper's method).
* `slq`: stochastic Lanczos quadrature (Ghorbani et al. 2019): nodes and weights whose
  Gaussian-broadened sum (`density`) estimates the whole eigenvalue density.
* `hutchinson_trace`: tr(H) ~ mean of v^T H v over Rademacher vectors.

The paper's spectrum is the distribution of the top-k eigenvalues of many mini-batch
Hessians; `hessian.json` stores `eigenvalues` per batch (its top-k, ordered by magnitude).

  python -m vitreg_jax.analysis.hessian --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--step=N ...] [--top_k=5] [--num_batches=10] [--method=power|lanczos] [--density]
      [--trace]
"""

import functools
from typing import Callable

from absl import app
from absl import flags
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax import plotting
from vitreg_jax import sharding
from vitreg_jax.analysis import runs

METHODS = ("power", "lanczos")
flags.DEFINE_integer("top_k", 5, "Eigenvalues per mini-batch (largest in magnitude).")
flags.DEFINE_integer("num_batches", 10, "Mini-batches whose Hessians are analysed.")
flags.DEFINE_enum("method", "power", METHODS, "power: PyHessian power iteration with "
                  "deflation (paper); lanczos: Lanczos with full reorthogonalization.")
flags.DEFINE_integer("max_iter", 100, "Power iteration: products per eigenvalue at most.")
flags.DEFINE_float("tol", 1e-3, "Power iteration: relative change of the eigenvalue to stop.")
flags.DEFINE_integer("lanczos_steps", 30, "Lanczos / SLQ steps (memory: steps x #params).")
flags.DEFINE_bool("density", False, "Also estimate the eigenvalue density by SLQ per batch.")
flags.DEFINE_bool("trace", False, "Also estimate tr(H) per batch by Hutchinson.")
flags.DEFINE_integer("num_vectors", 4, "Random vectors per batch for SLQ and Hutchinson.")


# ----------------------------------------------------------------------------- objective
def l2_penalty(params, weight_decay: float, decay_1d: bool = False):
  """`wd / 2 * sum w^2` over the decayed parameters (ndim >= 2 unless `decay_1d`)."""
  leaves = [p for p in jax.tree.leaves(params) if decay_1d or p.ndim >= 2]
  return 0.5 * weight_decay * sum(jnp.sum(jnp.square(p)) for p in leaves)


def make_objective(model, variables, *, weight_decay: float = 0.0, decay_1d: bool = False):
  """The analysed loss as a function of the flat parameter vector.

  Args:
    model: a flax module returning `(logits, out)`.
    variables: `{'params': ..., **model_state}`; model state (BatchNorm) is held fixed.
    weight_decay, decay_1d: the L2 penalty (see `l2_penalty`).
  Returns:
    `(loss(theta, batch) -> scalar, theta0 fp32 [n])`.
  """
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), variables["params"])
  state = {k: v for k, v in variables.items() if k != "params"}
  theta0, unravel = ravel_pytree(params)

  def loss(theta, batch):
    p = unravel(theta)
    logits, _ = model.apply({"params": p, **state}, batch["image"], train=False)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return nll + l2_penalty(p, weight_decay, decay_1d)

  return loss, theta0


def hvp(loss: Callable, theta, batch, v):
  """Hessian-vector product `H(theta) v` by forward-over-reverse differentiation."""
  return jax.jvp(lambda t: jax.grad(loss)(t, batch), (theta,), (v,))[1]


def dense_hessian(loss: Callable, theta, batch):
  """The full `[n, n]` Hessian, one column per product (tests and tiny models only)."""
  return jax.jit(lambda t, b: jax.lax.map(lambda e: hvp(loss, t, b, e),
                                          jnp.eye(t.size, dtype=t.dtype)))(theta, batch)


# ----------------------------------------------------------------------------- eigensolvers
def _project_out(v, basis):
  """Removes from `v` its components along the rows of `basis` (zero rows are inert)."""
  return v - basis.T @ (basis @ v)


def _normalize(v):
  return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)


def power_iteration(matvec: Callable, n: int, k: int, key, *, max_iter: int = 100,
                    tol: float = 1e-3):
  """Top-k eigenpairs (largest |eigenvalue|) by power iteration with deflation (PyHessian).

  For i = 1..k: start from a random unit vector orthogonal to the i-1 eigenvectors found,
  repeat `v <- normalize(P H v)` (P projects out the found eigenvectors) and
  `lambda <- v^T H v` until `|lambda - lambda_prev| < tol * |lambda_prev|` or `max_iter`
  products.

  Returns:
    `(eigenvalues [k], eigenvectors [k, n], products [k])` (products: H v calls used).
  """
  def one(i, carry):
    vals, vecs, used = carry
    v = _normalize(_project_out(jax.random.normal(jax.random.fold_in(key, i), (n,)), vecs))

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


def lanczos(matvec: Callable, v0, m: int):
  """m steps of Lanczos with full reorthogonalization from `v0`.

  Returns:
    `(alpha [m], beta [m - 1], V [m, n])`: `T = tridiag(beta, alpha, beta) = V H V^T`.
    After an invariant subspace is exhausted (beta ~ 0) the remaining vectors are zero and
    their Ritz values carry zero quadrature weight.
  """
  n = v0.shape[0]

  def step(j, carry):
    basis, alpha, beta, v, v_prev, b_prev = carry
    basis = basis.at[j].set(v)
    w = matvec(v) - b_prev * v_prev
    a = jnp.vdot(v, w)
    w = _project_out(_project_out(w - a * v, basis), basis)  # twice: classical GS is unstable
    b = jnp.linalg.norm(w)
    live = b > 1e-6 * jnp.maximum(jnp.abs(a), 1.0)
    v_next = jnp.where(live, w / jnp.where(live, b, 1.0), 0.0)
    b = jnp.where(live, b, 0.0)
    return basis, alpha.at[j].set(a), beta.at[j].set(b), v_next, v, b

  init = (jnp.zeros((m, n)), jnp.zeros(m), jnp.zeros(m), _normalize(v0), jnp.zeros(n),
          jnp.float32(0))
  basis, alpha, beta, *_ = jax.lax.fori_loop(0, m, step, init)
  return alpha, beta[:-1], basis


def _ritz(alpha, beta):
  t = jnp.diag(alpha) + jnp.diag(beta, 1) + jnp.diag(beta, -1)
  return jnp.linalg.eigh(t)


def lanczos_topk(matvec: Callable, n: int, k: int, key, *, steps: int = 30):
  """The k Ritz values largest in magnitude after `steps` Lanczos steps (ordered by |.|)."""
  alpha, beta, _ = lanczos(matvec, jax.random.normal(key, (n,)), min(steps, n))
  theta, _ = _ritz(alpha, beta)
  order = jnp.argsort(-jnp.abs(theta))
  return theta[order[:k]]


def slq(matvec: Callable, n: int, key, *, num_vectors: int = 4, steps: int = 30):
  """Stochastic Lanczos quadrature: nodes and weights `[num_vectors, steps]`.

  For a Rademacher vector v, the Lanczos tridiagonal T of (H, v) gives
  `v^T f(H) v / |v|^2 ~ sum_i w_i f(theta_i)` with theta = eig(T) and w_i = (first component
  of the i-th eigenvector of T)^2 (exact for polynomials of degree < 2 steps). Each row of
  weights sums to 1.
  """
  def one(key):
    v = jax.random.rademacher(key, (n,), jnp.float32)
    alpha, beta, _ = lanczos(matvec, v, min(steps, n))
    theta, q = _ritz(alpha, beta)
    return theta, q[0] ** 2

  return jax.lax.map(one, jax.random.split(key, num_vectors))


def density(nodes, weights, grid, sigma: float):
  """Gaussian-broadened SLQ density on `grid`, averaged over the random vectors."""
  nodes, weights, grid = (np.asarray(a, np.float64) for a in (nodes, weights, grid))
  z = (grid[:, None, None] - nodes[None]) / sigma
  kernel = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))
  return (kernel * weights[None]).sum(-1).mean(-1)


def hutchinson_trace(matvec: Callable, n: int, key, *, num_vectors: int = 4):
  """tr(H) ~ mean_v v^T H v over Rademacher vectors (Hutchinson 1989)."""
  def one(key):
    v = jax.random.rademacher(key, (n,), jnp.float32)
    return jnp.vdot(v, matvec(v))
  return jax.lax.map(one, jax.random.split(key, num_vectors)).mean()


# ----------------------------------------------------------------------------- one run
def make_batch_analysis(loss: Callable, n: int, *, top_k: int, method: str = "power",
                        max_iter: int = 100, tol: float = 1e-3, lanczos_steps: int = 30,
                        with_density: bool = False, with_trace: bool = False,
                        num_vectors: int = 4):
  """A jitted `f(theta, batch, key) -> dict` of one mini-batch's spectrum figures."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if not 0 < top_k <= n:
    raise ValueError(f"top_k must be in [1, {n}] (the number of parameters), got {top_k}.")

  @jax.jit
  def analyse(theta, batch, key):
    matvec = functools.partial(hvp, loss, theta, batch)
    keys = jax.random.split(key, 3)
    res = {}
    if method == "power":
      res["eigenvalues"], _, res["products"] = power_iteration(
          matvec, n, top_k, keys[0], max_iter=max_iter, tol=tol)
    else:
      res["eigenvalues"] = lanczos_topk(matvec, n, top_k, keys[0], steps=lanczos_steps)
    if with_density:
      res["slq_nodes"], res["slq_weights"] = slq(matvec, n, keys[1], num_vectors=num_vectors,
                                                 steps=lanczos_steps)
    if with_trace:
      res["trace"] = hutchinson_trace(matvec, n, keys[2], num_vectors=num_vectors)
    return res

  return analyse


def analyse_run(run, batches, *, mesh, key, progress_desc: str = "hessian", num_batches=None,
                **options) -> dict:
  """Spectrum figures of `run` over `batches` (each sharded over `mesh`'s data axis).

  Returns:
    dict with `eigenvalues` ([num_batches][top_k], by decreasing magnitude), optionally
    `trace` (per batch), `slq_nodes` / `slq_weights` (per batch), `num_params`,
    `weight_decay`.
  """
  opt = run.config.get("optimizer", {}) or {}
  wd, decay_1d = float(opt.get("weight_decay", 0.0)), bool(opt.get("decay_1d_params", False))
  loss, theta = make_objective(run.model, run.variables, weight_decay=wd, decay_1d=decay_1d)
  analyse = make_batch_analysis(loss, theta.size, **options)
  theta = runs.replicate(theta, mesh)
  result = {"num_params": int(theta.size), "weight_decay": wd}
  for i, batch in enumerate(runs.progress(batches, num_batches, progress_desc)):
    res = jax.device_get(analyse(theta, runs.shard_batch(batch, mesh),
                                 jax.random.fold_in(key, i)))
    for name, value in res.items():
      result.setdefault(name, []).append(np.asarray(value).tolist())
  return result


# ----------------------------------------------------------------------------- plot
def plot(results: list, path: str) -> str:
  """Histograms of negative and positive eigenvalues (and SLQ densities) per run."""
  plt = plotting.pyplot()
  has_density = any("slq_nodes" in r for r in results)
  fig, axes = plt.subplots(1, 3 if has_density else 2, figsize=(13 if has_density else 9, 3.6))
  for r in results:
    lam = np.asarray(r["eigenvalues"], np.float64).ravel()
    total = max(lam.size, 1)
    for ax, part, sign in ((axes[0], lam[lam < 0], -1), (axes[1], lam[lam > 0], 1)):
      if part.size:
        w = np.full(part.size, 1.0 / total)  # fraction of all eigenvalues: counts compare
        ax.hist(sign * part, bins=30, weights=w, histtype="step", lw=1.5,
                label=f"{r['label']} ({part.size}/{total})")
  axes[0].set(title="negative eigenvalues", xlabel="|eigenvalue|", ylabel="fraction")
  axes[0].invert_xaxis()
  axes[1].set(title="positive eigenvalues", xlabel="eigenvalue")
  for ax in axes[:2]:
    ax.legend(fontsize=7)
  if has_density:
    for r in results:
      if "density" in r:
        axes[2].plot(r["density"]["grid"], r["density"]["values"], label=r["label"])
    axes[2].set(title="SLQ density", xlabel="eigenvalue", yscale="log")
    axes[2].legend(fontsize=7)
  fig.suptitle(f"Hessian top-{results[0]['top_k']} eigenvalues per mini-batch "
               f"({results[0]['method']})", fontsize=10)
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


def add_density(result: dict, points: int = 400) -> None:
  """Adds `density` (grid and values) from the run's SLQ nodes and weights."""
  nodes = np.asarray(result["slq_nodes"]).reshape(-1, np.shape(result["slq_nodes"])[-1])
  weights = np.asarray(result["slq_weights"]).reshape(nodes.shape)
  lo, hi = nodes.min(), nodes.max()
  pad = 0.05 * (hi - lo) + 1e-6
  grid = np.linspace(lo - pad, hi + pad, points)
  values = density(nodes, weights, grid, sigma=0.01 * (hi - lo) + 1e-6)
  result["density"] = {"grid": grid.tolist(), "values": values.tolist()}


# ----------------------------------------------------------------------------- main
def main(argv):
  del argv
  f = runs.FLAGS
  if f.num_batches < 1:
    raise app.UsageError("--num_batches must be >= 1.")
  out = runs.output_dir(f.out, f.workdir)
  loaded = runs.load_runs(f.workdir, f.step)
  mesh = sharding.make_mesh()
  options = dict(top_k=f.top_k, method=f.method, max_iter=f.max_iter, tol=f.tol,
                 lanczos_steps=f.lanczos_steps, with_density=f.density, with_trace=f.trace,
                 num_vectors=f.num_vectors)
  results = []
  for run in loaded:
    batch_size = f.batch_size or int(run.config.batch_size)
    name = runs.label(run, loaded)
    batches = runs.train_batches(run, batch_size, f.num_batches, f.seed)
    res = analyse_run(run, batches, mesh=mesh, key=jax.random.PRNGKey(f.seed),
                      num_batches=f.num_batches, progress_desc=name, **options)
    res.update(label=name, workdir=run.workdir, step=run.step, model_name=run.config.model_name,
               batch_size=batch_size, top_k=f.top_k, method=f.method)
    if f.density:
      add_density(res)
    results.append(res)
  summary = {"runs": results}
  if len(results) == 1:
    summary.update(results[0])  # one run: its figures also at the top level
  print("wrote", runs.write_json(f"{out}/hessian.json", summary))
  print("wrote", plot(results, f"{out}/hessian.png"))
  for r in results:
    lam = np.asarray(r["eigenvalues"])
    print(f"{r['label']}: {np.mean(lam < 0):.0%} negative, max {lam.max():.4g}, "
          f"min {lam.min():.4g}" + (f", trace {np.mean(r['trace']):.4g}" if "trace" in r else ""))


if __name__ == "__main__":
  app.run(main)
