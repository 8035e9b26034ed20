r"""Fourier analysis of feature maps ("How do ViTs work?", Section 3, Fig. 2a / 8).

For every feature map of a model (ViT / ARViT: the patch embedding, then per block the residual
stream after the attention sub-block and after the MLP sub-block; ResNet / AlterNet: the stem
and every block's output), on a batch of evaluation images:

1. drop the prefix tokens (CLS) and reshape the tokens to the patch grid `[B, h, w, C]`
   (CNN maps are used directly);
2. 2D FFT over space, log amplitude `log(|F| + 1e-6)`, centre-shift (frequency 0 in the middle);
3. average over the batch and the channels;
4. read the half-diagonal from frequency 0 to pi: points `i = 0..n` at frequency
   `(pi i / n, pi i / n)`, `n = min(h, w) // 2` (for non-square maps the row and column
   indices are `round(i h / 2n)` and `round(i w / 2n)`), and subtract the value at frequency 0.

The result is the *relative log amplitude* per block. The paper's summary (Fig. 2a) is the
value at the highest frequency (pi) against normalized depth: MSAs reduce it (low-pass),
Convs and MLPs raise it (high-pass).

Note: the authors' notebook reads the diagonal of the shifted spectrum from the centre to the
last row, which stops one bin short of pi on even grids (it ends at pi (1 - 2 / h)); here the
last point is pi itself, as the paper's axis says.

  python -m vitreg_jax.analysis.fourier --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--num_examples=500] [--split=val_id]
"""

from typing import List

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax import plotting
from vitreg_jax.analysis import runs


_FLAG_SPECS = [
    (flags.DEFINE_integer, "num_examples", 500, "Evaluation examples averaged over."),
    (flags.DEFINE_string, "split", None,
     "Evaluation split (default: the run's first eval split)."),
]


def define_flags() -> None:
  """This command's flags, defined when it runs (its `__main__`), not at import."""
  runs.define_flags(_FLAG_SPECS)


# Block kinds: the attention side and the conv / MLP side of the paper's contrast.
ATTENTION_KINDS = ("msa",)
LOG_EPS = 1e-6


def feature_maps(model, variables, images) -> List[dict]:
  """The model's feature maps as spatial grids, in depth order.

  Returns:
    list of `{'name', 'kind', 'map' [B, h, w, C]}`; kind is 'embed', 'msa', 'mlp', 'stem',
    'conv' or 'smooth' (a CNN's stage-end spatial smoothing, `smoothing=True`).
  """
  _, out = model.apply(variables, images, train=False)
  if hasattr(model, "token_layout"):  # ViT-like: tokens on a patch grid
    gh, gw, prefix = model.token_layout(images.shape[1:3])
    grid = lambda t: t[:, prefix:].reshape(t.shape[0], gh, gw, t.shape[-1])
    maps = [dict(name="embedding", kind="embed", map=grid(out["block0"]["input"]))]
    for i in range(model.depth):
      block = out[f"block{i}"]
      maps.append(dict(name=f"block{i}/attn", kind="msa", map=grid(block["after_attn"])))
      maps.append(dict(name=f"block{i}/mlp", kind="mlp", map=grid(block["output"])))
    return maps
  kinds = model.block_kinds() if hasattr(model, "block_kinds") else None
  maps = [dict(name="stem", kind="stem", map=out["stem"])]
  i = 0
  while f"block{i}" in out:
    block = out[f"block{i}"]
    maps.append(dict(name=f"block{i}", kind=kinds[i] if kinds else "conv", map=block["output"]))
    if "smoothed" in block:  # the stage-end spatial smoothing (models/resnet.py)
      maps.append(dict(name=f"block{i}/smooth", kind="smooth", map=block["smoothed"]))
    i += 1
  return maps


def log_amplitude(fmap) -> jax.Array:
  """Centre-shifted log amplitude of the 2D FFT, averaged over batch and channels: `[h, w]`."""
  f = jnp.fft.fft2(jnp.asarray(fmap, jnp.float32), axes=(1, 2))
  logamp = jnp.log(jnp.abs(f) + LOG_EPS).mean(axis=(0, 3))
  return jnp.fft.fftshift(logamp)


def half_diagonal(logamp) -> tuple:
  """Frequencies (in units of pi) and the relative log amplitude along the half-diagonal."""
  logamp = np.asarray(logamp)
  h, w = logamp.shape
  n = min(h, w) // 2
  if n == 0:  # e.g. an ImageNet-stem ResNet's last stage on small images
    raise errors.UserError(
        f"A {h}x{w} feature map has no frequency above 0 on its diagonal: the Fourier analysis "
        "needs every feature map at least 2x2; use larger images (the dataset's image_size) "
        "or a model that downsamples less.")
  i = np.arange(n + 1)
  rows = (h // 2 + np.rint(i * h / (2 * n)).astype(int)) % h
  cols = (w // 2 + np.rint(i * w / (2 * n)).astype(int)) % w
  diag = logamp[rows, cols]
  return i / n, diag - diag[0]


def map_names(model, variables, image_shape) -> List[tuple]:
  """`(name, kind)` of every feature map, without computing it (abstract evaluation)."""
  names = []

  def trace(v, x):
    maps = feature_maps(model, v, x)
    names.extend((m["name"], m["kind"]) for m in maps)
    return [m["map"] for m in maps]

  jax.eval_shape(trace, variables, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return names


def spectra(model, variables, batches) -> List[dict]:
  """Relative log-amplitude spectra of every feature map over `batches` (image batches).

  Returns:
    list of `{'name', 'kind', 'depth' (normalized 0..1), 'freq' (x pi), 'rel_log_amp'}`.
  """
  # The weights are an argument, not constants baked into the compiled function.
  batch_logamp = jax.jit(
      lambda v, images: [log_amplitude(m["map"]) for m in feature_maps(model, v, images)])
  variables = jax.device_put(variables)
  total, count, image_shape = None, 0, None
  for batch in batches:
    images = batch["image"]
    image_shape = images.shape[1:]
    # Log amplitudes average linearly over examples: weight each batch by its size.
    amps = [a * images.shape[0] for a in batch_logamp(variables, images)]
    total = amps if total is None else [t + a for t, a in zip(total, amps)]
    count += images.shape[0]
  if total is None:
    raise errors.UserError("No batches to analyse (empty split?).")
  names = map_names(model, variables, image_shape)
  result = []
  for k, ((name, kind), amp) in enumerate(zip(names, total)):
    freq, rel = half_diagonal(np.asarray(amp) / count)
    result.append(dict(name=name, kind=kind, depth=k / max(len(names) - 1, 1),
                       freq=freq.tolist(), rel_log_amp=rel.tolist()))
  return result


# ----------------------------------------------------------------------------- plots
def plot_high_frequency(results: List[dict], path: str) -> str:
  """Relative log amplitude at frequency pi vs normalized depth; MSA points shaded."""
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for r in results:
    depth = np.array([b["depth"] for b in r["blocks"]])
    high = np.array([b["rel_log_amp"][-1] for b in r["blocks"]])
    attn = np.array([b["kind"] in ATTENTION_KINDS for b in r["blocks"]])
    line, = ax.plot(depth, high, "-", lw=1.2, label=r["label"])
    ax.plot(depth[attn], high[attn], "o", color=line.get_color(), mfc="white",
            label=f"{r['label']}: after MSA")
    ax.plot(depth[~attn], high[~attn], "s", color=line.get_color(), ms=4,
            label=f"{r['label']}: after conv / MLP")
    for d in depth[attn]:
      ax.axvspan(d - 0.01, d + 0.01, color="0.85", zorder=0)
  ax.set(xlabel="normalized depth", ylabel="delta log amplitude at pi",
         title="High-frequency log amplitude of feature maps")
  ax.legend(fontsize=7)
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


def plot_spectra(results: List[dict], path: str) -> str:
  """Relative log amplitude vs frequency for every block (colour = depth), one panel per run."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
  cmap = plt.get_cmap("plasma")
  for ax, r in zip(axes[0], results):
    for b in r["blocks"]:
      ax.plot(b["freq"], b["rel_log_amp"], color=cmap(0.9 * b["depth"]), lw=1,
              ls="--" if b["kind"] in ATTENTION_KINDS else "-")
    ax.set(title=r["label"], xlabel="frequency (x pi)", ylabel="delta log amplitude")
  sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1 / 0.9))
  fig.colorbar(sm, ax=axes[0].tolist(), label="normalized depth (dashed: after MSA)")
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- main
def per_block_over_examples(loaded, analyse) -> List[dict]:
  """Per run, `analyse(run, batches) -> blocks` over `--num_examples` examples of `--split`
  (the Fourier and the feature-map variance analyses)."""
  f = runs.FLAGS
  results = []
  for run in loaded:
    split = f.split or runs.default_eval_split(run)
    batch_size = f.batch_size or min(int(run.config.eval_batch_size), f.num_examples)
    name = runs.label(run, loaded)
    batches = runs.progress(runs.eval_batches(run, split, batch_size, f.num_examples),
                            -(-f.num_examples // batch_size), name)
    results.append(dict(label=name, workdir=run.workdir, step=run.step, split=split,
                        model_name=run.config.model_name, blocks=analyse(run, batches)))
  return results


def main(argv):
  del argv
  out, loaded = runs.output_and_runs("num_examples")
  results = per_block_over_examples(loaded,
                                    lambda run, batches: spectra(run.model, run.variables, batches))
  print("wrote", runs.write_summary(f"{out}/fourier.json", results))
  print("wrote", plot_high_frequency(results, f"{out}/fourier.png"))
  print("wrote", plot_spectra(results, f"{out}/fourier_spectra.png"))
  for r in results:
    print(r["label"] + ": " + ", ".join(f"{b['name']} {b['rel_log_amp'][-1]:+.2f}"
                                        for b in r["blocks"]))


if __name__ == "__main__":
  define_flags()
  app.run(runs.usage_errors(main))
