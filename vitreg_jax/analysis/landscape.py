r"""Loss landscapes along random normalized directions ("How do ViTs work?", Fig. 1a).

The visualization of Li et al. 2018 ("Visualizing the loss landscape of neural nets"), as the
authors run it (xxxnell/how-do-vits-work, ops/loss_landscapes.py, `get_loss_landscape`, and
losslandscape.ipynb). This command reproduces their Fig. 1a, so its defaults are their code's
(`--normalization=authors`, `--l2=authors`); Li et al.'s per-filter scheme and the squared L2
term are one flag away. The JSON and the plots name both.

1. Draw two random Gaussian directions `d1, d2` shaped like the parameters.
2. Normalize them (`NORMALIZATIONS`):
   * `authors` (default): their `normalize_filter`, `d <- d ||w||_0 / (||d||_0 + 1e-7)` with
     the norms taken over PyTorch's dim 0 of each weight, i.e. over its *output* channels, one
     norm per input position (a conv's (in, kh, kw), a dense layer's input feature). Flax
     kernels are `[..., in, out]`, so that is the output axes here; other tensors (the class
     token) use axis 0, whose layout PyTorch shares. Their ViT (timm) fuses q, k and v into
     one `qkv` weight `[3 width, width]`, so the norm over its dim 0 spans q, k and v
     together: here the three kernels of one attention layer share one norm per input
     feature, over (q/k/v, heads, head_dim).
   * `filter` (Li et al., the paper's wording "filter normalization"): for every filter j of
     a parameter w (one output unit: a conv's output channel, a dense layer's output feature,
     one (head, feature) pair of an attention q/k/v kernel), `d_j <- d_j ||w_j|| /
     (||d_j|| + 1e-10)`, norms over the filter's inputs (Li et al.'s `normalize_direction`).
3. Zero the directions on 1-D parameters (LayerNorm / BatchNorm scales and biases, every bias:
   the authors' `ignore_bn`) and on parameters whose path matches an `--exclude` pattern
   (theirs: `pos_embed`, `relative_position`; here `pos_embedding`, `relative_position`).
4. Evaluate, at `theta0 + a d1 + b d2` for (a, b) on a `grid_points` x `grid_points` grid over
   `[-extent, extent]^2` (theirs: 21 x 21 over [-1, 1]) and on the 1-D line (a, 0):
   * `loss`: the run's training loss with its L2 term (`objective.py`, the one objective of
     the analyses: the authors' "loss landscapes with L2 regularization on augmented
     datasets"; by default their `NLL + weight_decay * l2`, l2 the sum of every parameter
     tensor's unsquared norm), on the same `--landscape_batches` training batches with the
     training augmentation (and Mixup/CutMix, label smoothing: `--augment_loss`) at every
     point, BatchNorm with its frozen running statistics;
   * `ce`: the same without its L2 term;
   * `accuracy` of the perturbed model on those batches;
   * `l2_norm`: `||theta||_2` over all parameters;
   * `norm_sum`: `sum_t ||theta_t||_2` over the parameter tensors, the `l2` column the
     authors record (`ops/norm.py`, `l2`).

Every point is a forward pass: one jitted function maps (`lax.map`, a scan) over a chunk of
`--points_per_call` points for one batch, so the whole grid compiles once.

  python -m vitreg_jax.analysis.landscape --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--grid_points=21] [--line_points=41] [--extent=1] [--landscape_batches=4]
      [--exclude=REGEX ...] [--normalization=authors|filter] [--points_per_call=21]
      [--l2=authors|squared|none] [--augment_loss=false]
"""

import itertools
import re
import time
from typing import Callable, Sequence

from absl import app
from absl import flags
from flax import traverse_util
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax import sharding
from vitreg_jax.analysis import landscape_plots
from vitreg_jax.analysis import objective
from vitreg_jax.analysis import runs

NORMALIZATIONS = ("authors", "filter")
# Each scheme's epsilon in `d * |w| / (|d| + eps)`: the authors' `normalize_filter`, Li et
# al.'s `normalize_direction` (tomgoldstein/loss-landscape, net_plotter.py).
EPS = {"authors": 1e-7, "filter": 1e-10}
DEFAULT_EXCLUDE = ("pos_embedding", "relative_position")


_FLAG_SPECS = [
    (flags.DEFINE_integer, "grid_points", 21, "Points per axis of the 2-D grid (0: no grid)."),
    (flags.DEFINE_integer, "line_points", 41, "Points of the 1-D line along the first "
     "direction (0: no line)."),
    (flags.DEFINE_float, "extent", 1.0,
     "The grid and line span [-extent, extent] along each direction."),
    (flags.DEFINE_integer, "landscape_batches", 4, "Training batches averaged at every point."),
    (flags.DEFINE_multi_string, "exclude", list(DEFAULT_EXCLUDE), "Regex on parameter paths "
     "('a/b/kernel') kept fixed (repeatable; 'none' excludes nothing)."),
    (flags.DEFINE_enum, "normalization", "authors", NORMALIZATIONS, "authors: norms over "
     "a weight's output channels, PyTorch's dim 0 (their ops/loss_landscapes.py); filter: "
     "per-filter norms (Li et al.)."),
    (flags.DEFINE_integer, "points_per_call", 21, "Grid points per compiled call (a scan)."),
]


def define_flags() -> None:
  """This command's flags, defined when it runs (its `__main__`), not at import."""
  objective.define_flags()
  runs.define_flags(_FLAG_SPECS)


_QKV = ("query", "key", "value")


# ----------------------------------------------------------------------------- directions
def _name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def moved(path, leaf, exclude: Sequence[str] = ()) -> bool:
  """Whether a parameter moves along the directions: >= 2-D, not a bias, not excluded."""
  name = _name(path)
  if leaf.ndim < 2 or name.rsplit("/", 1)[-1] == "bias":
    return False
  return not any(re.search(pattern, name) for pattern in exclude)


def output_axes(path, leaf) -> tuple:
  """The axes indexing a parameter's filters (output units): the last axis (flax kernels are
  `[..., in, out]`), the last two for attention q/k/v kernels `[width, heads, head_dim]`."""
  keys = _name(path).split("/")
  if leaf.ndim == 3 and keys[-1] == "kernel" and len(keys) > 1 and keys[-2] in _QKV:
    return (leaf.ndim - 2, leaf.ndim - 1)
  return (leaf.ndim - 1,)


def _norm_axes(path, w, normalization: str) -> tuple:
  """The axes a norm runs over: a filter's inputs (`filter`), or PyTorch's dim 0 (`authors`:
  a kernel's output axes, axis 0 of other tensors)."""
  out = output_axes(path, w)
  if normalization == "filter":
    return tuple(a for a in range(w.ndim) if a not in out)
  return out if _name(path).endswith("kernel") else (0,)


def _fused_qkv(path):
  """The attention layer of a q/k/v kernel (one fused `qkv` weight in the authors' ViT)."""
  keys = _name(path).split("/")
  if len(keys) > 2 and keys[-1] == "kernel" and keys[-2] in _QKV:
    return "/".join(keys[:-2])
  return None


def normalize_directions(leaves: Sequence, ds: Sequence, normalization: str = "authors"):
  """`d * |w| / (|d| + eps)` for every `(path, w)` of `leaves` and its direction in `ds`,
  the norms over `_norm_axes` (keepdims); `authors`: the squared norms of one attention
  layer's q, k and v kernels summed (their fused `qkv` weight)."""
  sq = lambda x, axes: jnp.sum(jnp.square(x), axis=axes, keepdims=True)
  axes = [_norm_axes(p, w, normalization) for p, w in leaves]
  d_sq = [sq(d, a) for d, a in zip(ds, axes)]
  w_sq = [sq(w, a) for (_, w), a in zip(leaves, axes)]
  if normalization == "authors":
    groups = [_fused_qkv(p) for p, _ in leaves]
    for sums in (d_sq, w_sq):
      total = {}
      for g, s in zip(groups, sums):
        if g is not None:
          total[g] = total.get(g, 0.0) + s
      sums[:] = [s if g is None else total[g] for g, s in zip(groups, sums)]
  eps = EPS[normalization]
  return [d * jnp.sqrt(w2) / (jnp.sqrt(d2) + eps) for d, d2, w2 in zip(ds, d_sq, w_sq)]


def random_directions(params, key, num: int = 2, *, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                      normalization: str = "authors") -> list:
  """`num` random Gaussian directions shaped like `params`, normalized, zero where not `moved`
  (as the authors do: normalized first, then zeroed)."""
  if normalization not in NORMALIZATIONS:
    raise errors.UserError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [(p, jnp.asarray(w, jnp.float32)) for p, w in leaves]
  directions = []
  for i in range(num):
    keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
    ds = [jax.random.normal(k, w.shape) for k, (_, w) in zip(keys, leaves)]
    normed = normalize_directions(leaves, ds, normalization)
    directions.append(jax.tree.unflatten(treedef, [
        d if moved(p, w, exclude) else jnp.zeros_like(w)
        for d, (p, w) in zip(normed, leaves)]))
  return directions


def excluded_names(params, exclude: Sequence[str]) -> list:
  """Paths of the >= 2-D non-bias parameters that `exclude` keeps fixed."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [_name(p) for p, w in flat
          if np.ndim(w) >= 2 and _name(p).rsplit("/", 1)[-1] != "bias" and not moved(
              p, np.asarray(w), exclude)]


# ----------------------------------------------------------------------------- evaluation
def flat_directions(obj, directions: Sequence) -> jax.Array:
  """`[k, n]`: the direction trees flattened in the order of `obj.theta`."""
  return jnp.stack([ravel_pytree({k: traverse_util.flatten_dict(d, sep="/")[k]
                                  for k in obj.names})[0] for d in directions])


def make_evaluator(obj, theta0, directions):
  """A jitted `f(coords [P, k], batch) -> {'loss', 'ce', 'accuracy', 'l2_norm', 'norm_sum'}`
  (each `[P]`)
  at the points `theta0 + coords @ directions`, one point after another (a scan: the memory
  of one forward pass; one forward pass a point).

  Args:
    obj: the `objective.Objective` (its `measure`: loss, ce and accuracy of one batch).
    theta0: `[n]`; directions: `[k, n]` (`flat_directions`).
  """
  @jax.jit
  def evaluate(coords, batch, theta0, directions):
    def one(c):
      theta = theta0 + c @ directions
      m = obj.measure(theta, batch)
      return {"loss": m["loss"], "ce": m["ce"], "accuracy": m["accuracy"],
              "l2_norm": jnp.linalg.norm(theta),
              "norm_sum": objective.norm_sum(obj.params(theta))}
    return jax.lax.map(one, coords)

  return lambda coords, batch: evaluate(coords, batch, theta0, directions)


def evaluate_points(evaluate: Callable, coords: np.ndarray, batches: list, *,
                    points_per_call: int, progress_desc: str = "landscape") -> dict:
  """Averages `evaluate` over `batches` at every point of `coords [P, k]`, in chunks of
  `points_per_call` (the last one padded, so one compilation serves all).

  Returns:
    `evaluate`'s figures, each `[P]` (float64).
  """
  starts = range(0, len(coords), points_per_call)
  calls = itertools.product(starts, range(len(batches)))
  result = {}
  for start, b in runs.progress(calls, len(starts) * len(batches), progress_desc):
    chunk = coords[start:start + points_per_call]
    pad = np.zeros((points_per_call - len(chunk), coords.shape[1]), np.float32)
    res = jax.device_get(evaluate(jnp.asarray(np.concatenate([chunk, pad]), jnp.float32),
                                  batches[b]))
    for name, value in res.items():
      total = result.setdefault(name, np.zeros(len(coords)))
      total[start:start + len(chunk)] += np.asarray(value, np.float64)[:len(chunk)] / len(batches)
  return result


# ----------------------------------------------------------------------------- one run
def coordinates(grid_points: int, line_points: int, extent: float) -> dict:
  """The evaluated points: 'grid' (`[grid_points^2, 2]`, row j = y_j, column i = x_i),
  'line' (`[line_points, 2]`, along the first direction) and 'center' (`[1, 2]`)."""
  axis = lambda n: np.linspace(-extent, extent, n)
  gx, gy = np.meshgrid(axis(grid_points), axis(grid_points))
  line = axis(line_points)
  return {"grid": np.stack([gx.ravel(), gy.ravel()], -1),
          "line": np.stack([line, np.zeros_like(line)], -1), "center": np.zeros((1, 2))}


def analyse_run(run, batches: list, *, mesh, key, grid_points: int = 21, line_points: int = 41,
                extent: float = 1.0, exclude: Sequence[str] = DEFAULT_EXCLUDE,
                normalization: str = "authors", points_per_call: int = 21,
                augment: bool = True, l2: str = "authors",
                progress_desc: str = "landscape") -> dict:
  """The landscape of `run` on `batches` (training batches, sharded over `mesh`'s data axis).

  Returns:
    dict with `grid` (`x`, `y`, and the figures of `make_evaluator` as `[len(y)][len(x)]`),
    `line` (`alpha` and the figures), `center` (the figures at theta0), `num_params`,
    `num_moved` (entries the directions move), `excluded`, `normalization`, `l2` (the L2
    term's form), `objective` (in words), `weight_decay`, `seconds`, `points_per_s` (forward
    passes of one batch per second, compilation included).
  """
  obj = objective.from_run(run, augment=augment, l2=l2)
  directions = random_directions(run.variables["params"], key, 2, exclude=exclude,
                                 normalization=normalization)
  flat = flat_directions(obj, directions)
  evaluate = make_evaluator(obj, runs.replicate(obj.theta, mesh), runs.replicate(flat, mesh))
  batches = [runs.shard_batch(b, mesh) for b in batches]
  parts = coordinates(grid_points, line_points, extent)
  coords = np.concatenate(list(parts.values()))
  start = time.perf_counter()
  values = evaluate_points(evaluate, coords, batches, points_per_call=points_per_call,
                           progress_desc=progress_desc)
  seconds = time.perf_counter() - start
  result = {"num_params": int(obj.theta.size), "num_moved": int(jnp.sum(flat[0] != 0)),
            "excluded": excluded_names(run.variables["params"], exclude),
            "weight_decay": obj.weight_decay, "l2": obj.l2, "objective": obj.description,
            "label_smoothing": obj.label_smoothing,
            "augment_loss": obj.augment, "normalization": normalization, "extent": extent,
            "num_batches": len(batches), "seconds": seconds,
            "points_per_s": len(coords) * len(batches) / seconds}
  offset = 0
  for name, pts in parts.items():
    vals = {k: v[offset:offset + len(pts)] for k, v in values.items()}
    offset += len(pts)
    if name == "grid" and grid_points:
      shape = (grid_points, grid_points)
      result["grid"] = {"x": np.linspace(-extent, extent, grid_points).tolist(),
                        "y": np.linspace(-extent, extent, grid_points).tolist(),
                        **{k: v.reshape(shape).tolist() for k, v in vals.items()}}
    elif name == "line" and line_points:
      result["line"] = {"alpha": pts[:, 0].tolist(), **{k: v.tolist() for k, v in vals.items()}}
    elif name == "center":
      result["center"] = {k: float(v[0]) for k, v in vals.items()}
  return result


# ----------------------------------------------------------------------------- main
def _check_flags(f) -> list:
  """Validates the flags before any compute; returns the exclude patterns."""
  if f.grid_points < 0 or f.grid_points == 1 or f.line_points < 0 or f.line_points == 1:
    raise errors.UserError("--grid_points and --line_points must be 0 (skip) or >= 2.")
  if not f.grid_points and not f.line_points:
    raise errors.UserError("--grid_points=0 and --line_points=0 leave nothing to evaluate.")
  if f.extent <= 0 or f.landscape_batches < 1 or f.points_per_call < 1:
    raise errors.UserError("Need --extent > 0, --landscape_batches >= 1, --points_per_call >= 1.")
  exclude = [] if list(f.exclude) == ["none"] else list(f.exclude)
  for pattern in exclude:
    try:
      re.compile(pattern)
    except re.error as e:
      raise errors.UserError(f"--exclude={pattern!r} is not a regular expression: {e}.") from None
  return exclude


def main(argv):
  del argv
  f = runs.FLAGS
  exclude = _check_flags(f)
  out, loaded = runs.output_and_runs()
  mesh = sharding.make_mesh()
  results = []
  for run in loaded:
    batch_size = f.batch_size or int(run.config.batch_size)
    name = runs.label(run, loaded)
    batches = list(runs.train_batches(run, batch_size, f.landscape_batches, f.seed))
    res = analyse_run(run, batches, mesh=mesh, key=jax.random.PRNGKey(f.seed),
                      grid_points=f.grid_points, line_points=f.line_points, extent=f.extent,
                      exclude=exclude, normalization=f.normalization,
                      points_per_call=f.points_per_call, augment=f.augment_loss, l2=f.l2,
                      progress_desc=name)
    res.update(label=name, workdir=run.workdir, step=run.step, batch_size=batch_size,
               model_name=run.config.model_name)
    results.append(res)
  print("wrote", runs.write_summary(f"{out}/landscape.json", results))
  print("wrote", landscape_plots.plot_contours(results, f"{out}/landscape.png"))
  if f.grid_points:
    print("wrote", landscape_plots.plot_surfaces(results, f"{out}/landscape_surface.png"))
  for r in results:
    c = r["center"]
    span = r.get("grid") or r["line"]
    print(f"{r['label']} [{r['objective']}, {r['normalization']} normalization]: "
          f"centre loss {c['loss']:.4g} (without L2 {c['ce']:.4g}), "
          f"accuracy {c['accuracy']:.3f}, "
          f"|theta| {c['l2_norm']:.4g}; loss over the points {np.min(span['loss']):.4g} .. "
          f"{np.max(span['loss']):.4g}; {r['points_per_s']:.3g} point-batches/s")


if __name__ == "__main__":
  define_flags()
  app.run(runs.usage_errors(main))
