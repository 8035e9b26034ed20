r"""Hessian eigenvalue spectra ("How do ViTs work?", Section 2, Fig. 1c, 4 and 12c).

The analysed loss is the run's training loss, NLL + L2 on the training batches with their
Mixup/CutMix and label smoothing (`objective.py`; `--augment_loss=false` for the plain NLL +
L2); the model runs in inference mode (BatchNorm frozen, no dropout). The L2 term is the
authors' by default, `wd * sum_t ||w_t||_2` over every parameter tensor (their `ops/norm.py`,
`l2`, added as in `losslandscape.ipynb`; their repository holds no Hessian code, so the
Hessian takes the objective of their landscapes, "NLL + L2"); `--l2=squared` is `wd / 2 * |w|^2`, whose Hessian
`wd * I` (on the decayed parameters) would shift the spectrum up by wd; `--l2=none` drops it.
The paper's spectrum is the distribution of the top-k eigenvalues of many mini-batch
Hessians: `hessian.json` stores `eigenvalues` per batch (its top-k, ordered by magnitude),
with `l2` (the form) and `objective` (in words). With and without L2:

* `--without_l2` (default on, when the run has weight decay): the same figures for the
  objective without its L2 term, from the same batches and random start vectors, under
  `without_l2`, and a second row in `hessian.png` (and `hessian_steps.png`, dashed lines in
  `hessian_blocks.png`): negative eigenvalues smaller than the L2 term's curvature, which
  the term hides, are visible there.

Beyond one mini-batch:

* `--over=dataset`: the Hessian of the mean loss over `num_batches x batch_size` examples
  (products summed over the stacked batches in one compiled `lax.scan`, `operators.py`),
  stored under `dataset` beside the per-batch spectra (`--over=batch --over=dataset`: both).
* `--params=REGEX`: the Hessian of the parameters whose path matches (the exact diagonal
  block of the full Hessian); `--per_block`: every block in turn (`objective.param_blocks`:
  a ViT's MSA and MLP sub-blocks, a ResNet / AlterNet's Conv and MSA blocks), its top-k and
  Hutchinson trace under `blocks`, plotted against depth in `hessian_blocks.png` (the
  slides' MSA vs Conv contrast, layer by layer). One compilation serves every block.
* `--step=N` repeated: every checkpoint in one call; `hessian_steps.png` shows the slides'
  "early phase of training" panels, negative and positive top eigenvalues per step.
* `--operator=ggn`: the generalized Gauss-Newton matrix (PSD) instead of the Hessian.
* `--basis=device|bf16|host`: where Lanczos / SLQ keep their Krylov basis (`spectrum.py`).

  python -m vitreg_jax.analysis.hessian --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--step=N ...] [--top_k=5] [--num_batches=10] [--method=power|lanczos] [--density]
      [--trace] [--over=batch|dataset ...] [--params=REGEX | --per_block]
      [--operator=hessian|ggn] [--basis=device|bf16|host] [--augment_loss=false]
      [--l2=authors|squared|none] [--without_l2=false]
"""

import functools
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax import sharding
from vitreg_jax.analysis import hessian_plots
from vitreg_jax.analysis import objective
from vitreg_jax.analysis import operators
from vitreg_jax.analysis import runs
from vitreg_jax.analysis import spectrum

METHODS = ("power", "lanczos")


_FLAG_SPECS = [
    (flags.DEFINE_integer, "top_k", 5, "Eigenvalues per mini-batch (largest in magnitude)."),
    (flags.DEFINE_integer, "num_batches", 10, "Mini-batches whose Hessians are analysed."),
    (flags.DEFINE_enum, "method", "power", METHODS, "power: PyHessian power iteration with "
     "deflation (paper); lanczos: Lanczos with full reorthogonalization."),
    (flags.DEFINE_integer, "max_iter", 100, "Power iteration: products per eigenvalue at most."),
    (flags.DEFINE_float, "tol", 1e-3,
     "Power iteration: relative change of the eigenvalue to stop."),
    (flags.DEFINE_integer, "lanczos_steps", 30, "Lanczos / SLQ steps (memory: steps x #params, "
     "see --basis)."),
    (flags.DEFINE_bool, "density", False,
     "Also estimate the eigenvalue density by SLQ per batch."),
    (flags.DEFINE_bool, "trace", False, "Also estimate tr(H) per batch by Hutchinson."),
    (flags.DEFINE_integer, "num_vectors", 4, "Random vectors per batch for SLQ and Hutchinson."),
    (flags.DEFINE_multi_enum, "over", ["batch"], ["batch", "dataset"], "batch: one spectrum "
     "per mini-batch (paper); dataset: the Hessian of the loss over all num_batches x "
     "batch_size examples. Repeat for both."),
    (flags.DEFINE_string, "params", None, "Regex (re.search on paths like "
     "'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'): the Hessian of the matching "
     "parameters only."),
    (flags.DEFINE_bool, "per_block", False, "Top-k and trace of each block's Hessian (MSA / "
     "MLP / Conv), plotted against depth in hessian_blocks.png."),
    (flags.DEFINE_enum, "operator", "hessian", operators.OPERATORS, "hessian, or ggn: the "
     "generalized Gauss-Newton matrix J^T H_out J + L2 (positive semi-definite)."),
    (flags.DEFINE_enum, "basis", "device", spectrum.BASES, "Where Lanczos / SLQ keep the "
     "Krylov basis: device (fp32), bf16 (device, half the memory) or host (RAM)."),
    (flags.DEFINE_bool, "without_l2", True, "Also the same figures for the objective without "
     "its L2 term (under 'without_l2'), so negative eigenvalues the term hides are visible "
     "(skipped with --l2=none or no weight decay)."),
]


def define_flags() -> None:
  """This command's flags, defined when it runs (its `__main__`), not at import."""
  objective.define_flags()
  runs.define_flags(_FLAG_SPECS)


# ----------------------------------------------------------------------------- one operator
def make_batch_analysis(matvec_fn: Callable, n: int, *, top_k: int, method: str = "power",
                        max_iter: int = 100, tol: float = 1e-3, lanczos_steps: int = 30,
                        with_density: bool = False, with_trace: bool = False,
                        num_vectors: int = 4, basis: str = "device"):
  """`f(theta, data, key, mask=None) -> dict` of the spectrum figures of one operator.

  Args:
    matvec_fn: `(theta, data, v) -> A v` (`operators.batch_operator`, or `over_dataset` of
      it with stacked batches as `data`).
    n: the vector's size. mask: an optional 0/1 block mask (`Objective.mask`).
  Returns:
    A function whose dict holds `eigenvalues` [top_k] (by decreasing magnitude), with power
    iteration `products` [top_k], and optionally `trace`, `slq_nodes` / `slq_weights`.
  """
  if method not in METHODS:
    raise errors.UserError(f"method must be one of {METHODS}, got {method!r}.")
  if basis not in spectrum.BASES:
    raise errors.UserError(f"basis must be one of {spectrum.BASES}, got {basis!r}.")
  if not 0 < top_k <= n:
    raise errors.UserError(f"top_k must be in [1, {n}] (the number of parameters), got {top_k}.")

  def krylov(matvec, keys, mask, where):
    res = {}
    if method == "lanczos":
      res["eigenvalues"] = spectrum.lanczos_topk(matvec, n, top_k, keys[0], mask=mask,
                                                 steps=lanczos_steps, basis=where)
    if with_density:
      res["slq_nodes"], res["slq_weights"] = spectrum.slq(
          matvec, n, keys[1], num_vectors=num_vectors, steps=lanczos_steps, mask=mask,
          basis=where)
    return res

  @jax.jit
  def on_device(theta, data, key, mask):
    matvec = operators.masked(functools.partial(matvec_fn, theta, data), mask)
    keys, res = jax.random.split(key, 3), {}
    if method == "power":
      res["eigenvalues"], _, res["products"] = spectrum.power_iteration(
          matvec, n, top_k, keys[0], max_iter=max_iter, tol=tol, mask=mask)
    if with_trace:
      res["trace"] = spectrum.hutchinson_trace(matvec, n, keys[2], num_vectors=num_vectors,
                                               mask=mask)
    if basis != "host":
      res.update(krylov(matvec, keys, mask, basis))
    return res

  if basis != "host":
    return lambda theta, data, key, mask=None: on_device(theta, data, key, mask)
  product = jax.jit(lambda theta, data, mask, v: operators.masked(
      functools.partial(matvec_fn, theta, data), mask)(v))

  def analyse(theta, data, key, mask=None):
    res = on_device(theta, data, key, mask)
    res.update(krylov(functools.partial(product, theta, data, mask), jax.random.split(key, 3),
                      mask, "host"))
    return res
  return analyse


# ----------------------------------------------------------------------------- one run
def _collect(result: dict, res: dict) -> None:
  for name, value in jax.device_get(res).items():
    result.setdefault(name, []).append(np.asarray(value).tolist())


def _stack(batches: list, mesh) -> dict:
  """The batches stacked on a leading axis, each batch split over the mesh's data axis."""
  sharding.check_batch_divisible(len(batches[0]["label"]), mesh)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA_AXIS))
  return jax.device_put(stacked, spec)


def spectra(obj, batches: list, *, mesh, key, over=("batch",), operator: str = "hessian",
            per_block: bool = False, desc: str = "hessian", **options) -> dict:
  """Spectrum figures of `obj` (an `objective.Objective`) over host `batches`.

  Returns:
    per-batch figures (`eigenvalues` [num_batches][top_k], `products`, `trace`, `slq_*`) when
    `'batch' in over`; `dataset` (the same figures of the dataset Hessian) when
    `'dataset' in over`; `blocks` (label, kind, num_params and those figures per block) with
    `per_block`; `num_params`.
  """
  n = int(obj.theta.size)
  blocks = objective.param_blocks(obj.names) if per_block else []
  if per_block:
    options["with_trace"] = True
  masks = [(None, None)] + [(b, obj.mask(b[2])) for b in blocks]
  if per_block:  # the whole model through the same compiled (masked) function
    masks[0] = (None, jnp.ones(n))
  theta = runs.replicate(obj.theta, mesh)
  matvec = operators.batch_operator(obj, operator)
  results = [{"num_params": n} if b is None else
             {"label": b[0], "kind": b[1], "num_params": int(m.sum())} for b, m in masks]
  if "batch" in over:
    analyse = make_batch_analysis(matvec, n, **options)
    sharded = [runs.shard_batch(b, mesh) for b in batches]
    steps = [(i, r, m, x) for r, (_, m) in zip(results, masks) for i, x in enumerate(sharded)]
    for i, r, m, x in runs.progress(steps, len(steps), f"{desc} (per batch)"):
      _collect(r, analyse(theta, x, jax.random.fold_in(key, i), m))
  if "dataset" in over:
    analyse = make_batch_analysis(operators.over_dataset(matvec), n, **options)
    stacked = _stack(batches, mesh)
    for r, (_, m) in runs.progress(list(zip(results, masks)), len(masks), f"{desc} (dataset)"):
      r["dataset"] = jax.tree.map(lambda a: np.asarray(a).tolist(), jax.device_get(
          analyse(theta, stacked, jax.random.fold_in(key, len(batches)), m)))
      r["dataset"]["num_examples"] = sum(len(b["label"]) for b in batches)
  return {**results[0], "blocks": results[1:]} if per_block else results[0]


def add_density(result: dict, points: int = 400) -> None:
  """Adds `density` (grid and values) from the run's SLQ nodes and weights."""
  nodes = np.asarray(result["slq_nodes"]).reshape(-1, np.shape(result["slq_nodes"])[-1])
  weights = np.asarray(result["slq_weights"]).reshape(nodes.shape)
  lo, hi = nodes.min(), nodes.max()
  pad = 0.05 * (hi - lo) + 1e-6
  grid = np.linspace(lo - pad, hi + pad, points)
  values = spectrum.density(nodes, weights, grid, sigma=0.01 * (hi - lo) + 1e-6)
  result["density"] = {"grid": grid.tolist(), "values": values.tolist()}


# ----------------------------------------------------------------------------- main
def _check_flags(f) -> None:
  if f.per_block and f.params:
    raise errors.UserError("--per_block analyses every block in turn; drop --params (or drop "
                         "--per_block to analyse the --params subset).")


def _analyse(run, loaded, mesh, f, options) -> dict:
  obj = objective.from_run(run, augment=f.augment_loss, params=f.params, l2=f.l2)
  if f.per_block:
    objective.param_blocks(obj.names)  # a model without blocks fails before any compute
  batch_size = f.batch_size or int(run.config.batch_size)
  name = runs.label(run, loaded)
  batches = list(runs.train_batches(run, batch_size, f.num_batches, f.seed))
  objectives = {"": obj}
  if f.without_l2 and obj.l2 != "none" and obj.weight_decay:
    objectives["without_l2"] = obj.with_l2("none")
  found = {}
  for key, o in objectives.items():  # the same batches and random vectors for both
    found[key] = spectra(o, batches, mesh=mesh, key=jax.random.PRNGKey(f.seed), over=f.over,
                         operator=f.operator, per_block=f.per_block,
                         desc=f"{name} {key}".strip(), **options)
    found[key]["objective"] = o.description
    if f.density and "slq_nodes" in found[key]:
      add_density(found[key])
  res = found.pop("")
  res.update(found)
  res.update(label=name, workdir=run.workdir, step=run.step, model_name=run.config.model_name,
             batch_size=batch_size, top_k=f.top_k, method=f.method, operator=f.operator,
             over=list(f.over), params=f.params, weight_decay=obj.weight_decay, l2=obj.l2,
             label_smoothing=obj.label_smoothing,
             mixup=bool(f.augment_loss and run.config.data.get("mixup")))
  return res


def main(argv):
  del argv
  f = runs.FLAGS
  _check_flags(f)
  out, loaded = runs.output_and_runs("num_batches")
  for run in loaded:  # bad --params / --per_block fail here, before any compute
    obj = objective.from_run(run, augment=f.augment_loss, params=f.params, l2=f.l2)
    if f.per_block:
      objective.param_blocks(obj.names)
  mesh = sharding.make_mesh()
  options = dict(top_k=f.top_k, method=f.method, max_iter=f.max_iter, tol=f.tol,
                 lanczos_steps=f.lanczos_steps, with_density=f.density, with_trace=f.trace,
                 num_vectors=f.num_vectors, basis=f.basis)
  results = [_analyse(run, loaded, mesh, f, options) for run in loaded]
  print("wrote", runs.write_summary(f"{out}/hessian.json", results))
  for path in hessian_plots.plot_all(results, out):
    print("wrote", path)
  hessian_plots.print_summary(results)


if __name__ == "__main__":
  define_flags()
  app.run(runs.usage_errors(main))
