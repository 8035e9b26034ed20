r"""Feature-map variance ("How do ViTs work?", Section 3, Fig. 9: MSAs reduce it, Convs raise it).

For every feature map of a model (the same maps as the Fourier analysis, `fourier.feature_maps`:
ViT / ARViT the patch embedding and the residual stream after every attention and every MLP
sub-block, CLS dropped, tokens on the patch grid; ResNet / AlterNet the stem, every block's
output and, with `smoothing=True`, every stage-end smoothing), on evaluation images:

  variance = mean over examples b and channels c of  Var_{i, j} x[b, i, j, c]

the variance of the feature-map points over space, with Bessel's correction (`ddof=1`, PyTorch's
`Tensor.var` default), as the authors' featuremap_variance.ipynb (xxxnell/how-do-vits-work:
`latent.var(dim=[-1, -2]).mean(dim=[0, 1])`). They use one test batch; here the mean runs over
`--num_examples` evaluation examples (exact: the mean is linear, batches are weighted by size).
The figure is the variance against normalized depth, MSA outputs on grey bands and subsampling
blocks (the map shrinks) as dotted lines (their plot shades them blue; lines keep overlaid runs
apart).

  python -m vitreg_jax.analysis.variance --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--num_examples=500] [--split=val_id] [--log_scale]
"""

from typing import List

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax import plotting
from vitreg_jax import sharding
from vitreg_jax.analysis import fourier
from vitreg_jax.analysis import runs


_FLAG_SPECS = [
    (flags.DEFINE_bool, "log_scale", False,
     "Log-scale variance axis (models of different scales)."),
]


def define_flags() -> None:
  """This command's flags, defined when it runs (its `__main__`), not at import."""
  fourier.define_flags()  # --num_examples, and the common flags
  runs.define_once(_FLAG_SPECS)


def map_variance(fmap) -> jax.Array:
  """Spatial variance (ddof=1) of a `[B, h, w, C]` map, averaged over batch and channels."""
  x = jnp.asarray(fmap, jnp.float32)
  return jnp.var(x, axis=(1, 2), ddof=1).mean()


def map_shapes(model, variables, image_shape) -> List[tuple]:
  """`(h, w)` of every feature map (abstract evaluation, no compute)."""
  shapes = jax.eval_shape(
      lambda v, x: [m["map"] for m in fourier.feature_maps(model, v, x)], variables,
      jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return [tuple(s.shape[1:3]) for s in shapes]


def variances(model, variables, batches, mesh=None) -> List[dict]:
  """Feature-map variance of every map over `batches` (image batches).

  Returns:
    list of `{'name', 'kind', 'depth' (normalized 0..1), 'shape' [h, w], 'variance',
    'subsampling' (the map is smaller than the previous one)}`, in depth order.
  """
  batch_variance = jax.jit(
      lambda v, images: [map_variance(m["map"]) for m in fourier.feature_maps(model, v, images)])
  if mesh is not None:
    variables = runs.replicate(variables, mesh)
  total, count, image_shape = None, 0, None
  for batch in batches:
    images = batch["image"]
    image_shape, n = images.shape[1:], images.shape[0]
    if mesh is not None and n % mesh.size == 0:  # a last, smaller batch stays unsharded
      images = sharding.to_global({"image": images}, mesh)["image"]
    values = [float(v) * n for v in jax.device_get(batch_variance(variables, images))]
    total = values if total is None else [t + v for t, v in zip(total, values)]
    count += n
  if total is None:
    raise errors.UserError("No batches to analyse (empty split?).")
  names = fourier.map_names(model, variables, image_shape)
  shapes = map_shapes(model, variables, image_shape)
  result = []
  for k, ((name, kind), shape, value) in enumerate(zip(names, shapes, total)):
    smaller = k > 0 and shape[0] * shape[1] < shapes[k - 1][0] * shapes[k - 1][1]
    result.append(dict(name=name, kind=kind, depth=k / max(len(names) - 1, 1),
                       shape=list(shape), variance=value / count, subsampling=bool(smaller)))
  return result


# ----------------------------------------------------------------------------- plot
def plot(results: List[dict], path: str, log_scale: bool = False) -> str:
  """Feature-map variance vs normalized depth, one line per run; MSA blocks on grey bands,
  subsampling blocks as dotted lines, smoothing outputs as triangles."""
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  markers = {"msa": "o", "smooth": "v"}
  for r in results:
    blocks = r["blocks"]
    depth = np.array([b["depth"] for b in blocks])
    var = np.array([b["variance"] for b in blocks])
    line, = ax.plot(depth, var, "-", lw=1.2, label=r["label"])
    for kind, marker in (*markers.items(), (None, "s")):
      sel = np.array([(b["kind"] == kind) if kind else b["kind"] not in markers for b in blocks])
      if sel.any():
        ax.plot(depth[sel], var[sel], marker, color=line.get_color(), ms=4 if kind else 3,
                mfc="white" if kind == "msa" else line.get_color(), ls="none")
    step = 1 / max(len(blocks) - 1, 1)
    for b in blocks:
      if b["kind"] in fourier.ATTENTION_KINDS:
        ax.axvspan(b["depth"] - step, b["depth"], color="0.6", alpha=0.15, lw=0, zorder=0)
      if b["subsampling"]:  # a line in the run's colour: bands of overlaid runs would overlap
        ax.axvline(b["depth"], color=line.get_color(), ls=":", lw=1, zorder=0)
  ax.set(xlabel="normalized depth", ylabel="feature map variance", xlim=(0, 1),
         title="Feature-map variance (o / grey: after MSA, v: after smoothing, "
               "dotted: subsampling block)")
  ax.title.set_fontsize(8)
  if log_scale:
    ax.set_yscale("log")
  else:
    ax.set_ylim(bottom=0)
  ax.legend(fontsize=7)
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- main
def main(argv):
  del argv
  out, loaded = runs.output_and_runs("num_examples")
  mesh = sharding.make_mesh()
  results = fourier.per_block_over_examples(
      loaded, lambda run, batches: variances(run.model, run.variables, batches, mesh))
  print("wrote", runs.write_summary(f"{out}/variance.json", results))
  print("wrote", plot(results, f"{out}/variance.png", runs.FLAGS.log_scale))
  for r in results:
    print(r["label"] + ": " + ", ".join(f"{b['name']} {b['variance']:.3g}" for b in r["blocks"]))


if __name__ == "__main__":
  define_flags()
  app.run(runs.usage_errors(main))
