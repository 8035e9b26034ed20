r"""Mean attention distance and attention entropy per layer: what ARViT's penalties do to attention.

For every block of a ViT-like model (`vit`, `arvit`), on evaluation images, with `A[b, h]` the
block's attention probabilities of head h on image b restricted to the patch tokens and
renormalized per query row (prefix tokens such as CLS are dropped as queries and as keys; a row
then sums to 1 over the patches, so the figures describe where the attention *among patches*
goes and models with and without CLS compare):

  distance[b, h] = mean_q  sum_k A[b, h, q, k] * ||pos(q) - pos(k)||_2
  entropy[b, h]  = mean_q  -sum_k A[b, h, q, k] * log A[b, h, q, k]          (nats, 0 log 0 = 0)

`pos(n)` is patch n's (row, column) on the patch grid, so the distance is in patches (multiply
by the patch size for pixels). This is the "mean attention distance" of Dosovitskiy et al.
2021 (ViT, Section 4.5 and Fig. 7: "the average distance in image space across which
information is integrated, based on the attention weights", the query-key distance weighted by
the attention weight and averaged over images), here per query patch and in patch units.
Each block's figures are averaged over its heads and over `--num_examples` images (per-head
means are kept). References: uniform attention (`uniform_distance`, the mean distance between
two patches of the grid, and `max_entropy = log N`); a locality prior such as ARViT's distance
penalty (Section 3.2) should lower both in the block it regularizes.

  python -m vitreg_jax.analysis.attention_distance --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--num_examples=500] [--split=val] [--step=N] [--batch_size=B]

Writes `attention_distance.json` (per run: `blocks`, each with `distance`, `entropy`,
`head_distance`, `head_entropy`) and `attention_distance.png` (distance and entropy against
the block, runs overlaid, per-head values as dots).
"""

from typing import List

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax import plotting
from vitreg_jax.analysis import fourier
from vitreg_jax.analysis import runs

NAME = "attention_distance"


def define_flags() -> None:
  """This command's flags, defined when it runs (its `__main__`), not at import: the shared
  analysis flags and Fourier's `--num_examples` / `--split` (the same eval examples)."""
  fourier.define_flags()


def patch_distances(grid_hw) -> np.ndarray:
  """`[N, N]` Euclidean distances between patch grid positions (row-major), in patches."""
  gh, gw = grid_hw
  rows, cols = np.divmod(np.arange(gh * gw), gw)
  pos = np.stack([rows, cols], axis=-1).astype(np.float32)
  return np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))


def attention_statistics(attn, grid_hw, num_prefix: int = 0) -> dict:
  """Mean attention distance and entropy per image and head (module docstring).

  Args:
    attn: `[B, H, T, T]` attention probabilities, `T = num_prefix + gh * gw` tokens.
    grid_hw: `(gh, gw)`, the patch grid.
    num_prefix: leading non-patch tokens (CLS), dropped as queries and keys.

  Returns:
    dict of `distance` and `entropy`, `[B, H]` float32.
  """
  a = jnp.asarray(attn, jnp.float32)[:, :, num_prefix:, num_prefix:]
  a = a / jnp.maximum(a.sum(-1, keepdims=True), 1e-30)
  dist = jnp.asarray(patch_distances(grid_hw))
  distance = jnp.einsum("bhqk,qk->bhq", a, dist).mean(-1)
  entropy = -jnp.sum(jnp.where(a > 0, a * jnp.log(jnp.where(a > 0, a, 1.0)), 0.0), -1)
  return {"distance": distance, "entropy": entropy.mean(-1)}


def uniform_references(grid_hw) -> dict:
  """The figures of uniform attention over the patches: `uniform_distance`, `max_entropy`."""
  dist = patch_distances(grid_hw)
  return {"uniform_distance": float(dist.mean()), "max_entropy": float(np.log(dist.shape[0]))}


def per_block(model, variables, batches) -> List[dict]:
  """Per block: the statistics averaged over heads and images, and per head over images.

  Returns:
    list (block order) of `{'block', 'distance', 'entropy', 'head_distance' [H],
    'head_entropy' [H]}`.
  """
  if not hasattr(model, "token_layout"):
    raise errors.UserError(f"The attention-distance analysis needs a ViT-like model (vit, "
                           f"arvit); this run's model is {type(model).__name__}.")

  def sums(v, images):
    gh, gw, prefix = model.token_layout(images.shape[1:3])
    _, out = model.apply(v, images, train=False, capture_attention=True)
    stats = [attention_statistics(out[f"block{i}"]["attn"], (gh, gw), prefix)
             for i in range(model.depth)]
    return [{k: s.sum(0) for k, s in block.items()} for block in stats]

  batch_sums = jax.jit(sums)
  total, count = None, 0
  for batch in batches:
    values = jax.device_get(batch_sums(variables, batch["image"]))
    total = values if total is None else jax.tree.map(np.add, total, values)
    count += len(batch["image"])
  if total is None:
    raise errors.UserError("No batches to analyse (empty split?).")
  return [dict(block=i, distance=float(b["distance"].mean() / count),
               entropy=float(b["entropy"].mean() / count),
               head_distance=(b["distance"] / count).tolist(),
               head_entropy=(b["entropy"] / count).tolist())
          for i, b in enumerate(total)]


def analyse(run, split: str, num_examples: int, batch_size: int) -> dict:
  """One run's result: `blocks` (`per_block`), the uniform references and what was read."""
  name_batches = runs.eval_batches(run, split, batch_size, num_examples)
  blocks = per_block(run.model, run.variables,
                     runs.progress(name_batches, -(-num_examples // batch_size), split))
  image_hw = tuple(run.dataset.info.image_shape[:2])
  gh, gw, prefix = run.model.token_layout(image_hw)
  return dict(workdir=run.workdir, step=run.step, split=split, num_examples=num_examples,
              model_name=run.config.model_name, grid=[gh, gw], num_prefix_tokens=prefix,
              **uniform_references((gh, gw)), blocks=blocks)


# ----------------------------------------------------------------------------- plot
def plot(results: List[dict], path: str) -> str:
  """Mean attention distance (left) and entropy (right) against the block, one line per run,
  each head's value as a dot; dashed: uniform attention."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for key, ax, ref in (("distance", axes[0], "uniform_distance"),
                       ("entropy", axes[1], "max_entropy")):
    for r in results:
      blocks = [b["block"] + 1 for b in r["blocks"]]  # the paper counts blocks from 1
      line, = ax.plot(blocks, [b[key] for b in r["blocks"]], "o-", lw=1.4, label=r["label"])
      for b in r["blocks"]:
        heads = b[f"head_{key}"]
        ax.plot([b["block"] + 1] * len(heads), heads, ".", color=line.get_color(), ms=3,
                alpha=0.5)
      ax.axhline(r[ref], color=line.get_color(), ls="--", lw=0.8)
    ax.set(xlabel="block", ylabel="mean attention distance (patches)" if key == "distance"
           else "attention entropy (nats)")
    ax.xaxis.get_major_locator().set_params(integer=True)  # blocks are whole numbers
  axes[0].set_title("Mean attention distance (dots: heads, dashed: uniform)", fontsize=8)
  axes[1].set_title("Attention entropy (dashed: log N, uniform)", fontsize=8)
  axes[0].legend(fontsize=7)
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- main
def main(argv):
  del argv
  f = flags.FLAGS
  out, loaded = runs.output_and_runs("num_examples", "batch_size")
  results = []
  for run in loaded:
    split = f.split or runs.default_eval_split(run)
    batch_size = f.batch_size or min(int(run.config.eval_batch_size), f.num_examples)
    results.append(dict(label=runs.label(run, loaded),
                        **analyse(run, split, f.num_examples, batch_size)))
  print("wrote", runs.write_summary(f"{out}/{NAME}.json", results))
  print("wrote", plot(results, f"{out}/{NAME}.png"))
  for r in results:
    print(r["label"] + ": " + ", ".join(
        f"block{b['block'] + 1} {b['distance']:.2f} / {b['entropy']:.2f}" for b in r["blocks"])
          + "  (distance in patches / entropy in nats)")


if __name__ == "__main__":
  define_flags()
  app.run(runs.usage_errors(main))
