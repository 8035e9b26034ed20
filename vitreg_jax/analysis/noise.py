r"""Robustness to noise frequency ("How do ViTs work?", Section 3, Fig. 2b) and corruptions.

Frequency-band noise: white Gaussian noise per image and channel, 2D-FFT'd, kept only on the
band of frequencies `|omega|_inf / pi in [f - bandwidth / 2, f + bandwidth / 2]` (a square ring
around frequency f, the same distance the Fourier analysis reads along the diagonal), inverse
FFT'd and scaled to a fixed L2 norm `eps * sqrt(H W C)` per image (eps is the per-pixel RMS, in
the model's normalized input units). The figure is the error increase over clean images,
`err(x + noise_f) - err(x)`, for f swept over [0, 1] (x pi); the paper finds ViTs hurt most by
low-frequency noise and ResNets by high-frequency noise. The same noise (same seed) is used for
every model so the curves compare.

Corruptions: the mean accuracy over the `<corruption>_<severity>` splits of
`cifar10_corrupted` / `cifar100_corrupted` (Fig. 12's robustness), when the run trained on the
clean set of that dataset and the corrupted files are prepared (`--corruption=auto` does this
for runs on those datasets and skips others; see docs/data.md).

  python -m vitreg_jax.analysis.noise --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--eps=0.1] [--num_freqs=11] [--bandwidth=0.1] [--num_examples=1000]
"""

import functools
from typing import Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import plotting
from vitreg_jax.analysis import runs

flags.DEFINE_float("eps", 0.5, "Noise RMS per pixel (normalized input units).")
flags.DEFINE_integer("num_freqs", 11, "Band centres, evenly spaced over [0, pi].")
flags.DEFINE_float("bandwidth", 0.1, "Band width in units of pi.")
flags.DEFINE_integer("noise_examples", 1000, "Evaluation examples per frequency.")
flags.DEFINE_string("noise_split", None, "Split (default: the run's first eval split).")
flags.DEFINE_string("corruption", "auto", "'auto' (the run's dataset if it is a corrupted "
                    "one), 'none', or cifar10_corrupted / cifar100_corrupted.")

CORRUPTED = ("cifar10_corrupted", "cifar100_corrupted")


def band_mask(h: int, w: int, freq: float, bandwidth: float) -> np.ndarray:
  """Boolean `[h, w]` mask (unshifted FFT layout) of `|omega|_inf / pi` within the band."""
  wy = np.abs(np.fft.fftfreq(h)) * 2  # in units of pi: 0 .. 1
  wx = np.abs(np.fft.fftfreq(w)) * 2
  radius = np.maximum(wy[:, None], wx[None, :])
  return np.abs(radius - freq) <= bandwidth / 2 + 1e-9


def band_noise(key, shape, freq: float, bandwidth: float, eps: float) -> jax.Array:
  """Noise `[B, H, W, C]` whose spectrum lies in the band, L2 norm `eps sqrt(HWC)` per image."""
  return _noise_in(key, shape, _checked_band(shape, freq, bandwidth), eps)


def _checked_band(shape, freq: float, bandwidth: float) -> np.ndarray:
  mask = band_mask(shape[1], shape[2], freq, bandwidth)
  if not mask.any():
    raise ValueError(f"No frequency of a {shape[1]}x{shape[2]} image lies in the band {freq} "
                     f"+- {bandwidth / 2} (x pi): widen --bandwidth.")
  return mask


def _noise_in(key, shape, mask, eps):
  """Band noise for a band given as a `[H, W]` mask (traceable: the mask may be an argument)."""
  _, h, w, c = shape
  white = jax.random.normal(key, shape)
  spec = jnp.fft.fft2(white, axes=(1, 2)) * jnp.asarray(mask)[None, :, :, None]
  noise = jnp.real(jnp.fft.ifft2(spec, axes=(1, 2)))  # the band is symmetric: real already
  norm = jnp.sqrt(jnp.sum(noise**2, axis=(1, 2, 3), keepdims=True))
  return noise * (eps * np.sqrt(h * w * c) / jnp.maximum(norm, 1e-12))


def make_accuracy(model, variables):
  """A jitted `f(images, labels) -> number correct` (a device scalar: add them up there)."""
  @jax.jit
  def correct(variables, images, labels):
    logits, _ = model.apply(variables, images, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels)
  return functools.partial(correct, variables)


def _make_noisy_accuracy(model, variables, eps: float):
  """Jitted `f(images, labels, key, band) -> number correct` on `images + band noise`: the
  noise is drawn on the device, and the band is an argument, so every frequency shares one
  compilation."""
  @jax.jit
  def correct(variables, images, labels, key, band):
    noisy = images + _noise_in(key, images.shape, band, eps)
    logits, _ = model.apply(variables, noisy, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels)
  return functools.partial(correct, variables)


def frequency_sweep(model, variables, batches, freqs, *, eps: float, bandwidth: float,
                    key) -> dict:
  """Clean error and error under band noise at each frequency.

  Every batch's count stays on the device; the host reads them once, at the end.

  Args:
    batches: a list of `{'image', 'label'}` (reused for every frequency).
    freqs: band centres in units of pi.
  Returns:
    dict `freq`, `clean_error`, `error` (per freq), `error_increase` (per freq).
  """
  variables = jax.device_put(variables)
  batches = [jax.device_put({"image": b["image"], "label": b["label"]}) for b in batches]
  correct, noisy = make_accuracy(model, variables), _make_noisy_accuracy(model, variables, eps)
  n = sum(len(b["label"]) for b in batches)
  clean = sum(correct(b["image"], b["label"]) for b in batches)
  hits = []
  for fi, freq in enumerate(freqs):
    band = _checked_band(batches[0]["image"].shape, float(freq), bandwidth)
    hits.append(sum(noisy(b["image"], b["label"],
                          jax.random.fold_in(jax.random.fold_in(key, fi), bi), band)
                    for bi, b in enumerate(batches)))
  clean, hits = jax.device_get((clean, hits))
  clean = float(clean) / n
  errors = [1 - float(h) / n for h in hits]
  return dict(freq=[float(f) for f in freqs], clean_error=1 - clean, error=errors,
              error_increase=[e - (1 - clean) for e in errors], num_examples=n)


def corruption_accuracy(run, name: str, batch_size: int) -> dict:
  """Accuracy per corrupted split of dataset `name` and their mean (`mean_corruption_accuracy`)."""
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  cfg = run.config.data.to_dict()
  cfg.update(name=name, eval_splits=None)
  info = data.get_info(cfg)  # fails here, with the preparation command, if files are missing
  splits = [s for s in info.splits if s.rpartition("_")[2] in {"1", "2", "3", "4", "5"}]
  correct = make_accuracy(run.model, run.variables)
  accuracy = {}
  for split in runs.progress(splits, len(splits), f"{name} splits"):
    hits = total = 0
    for b in runs.eval_batches(run, split, batch_size, data_config=cfg):
      hits += correct(b["image"], b["label"])  # Summed on the device: one read per split.
      total += len(b["label"])
    accuracy[split] = float(hits) / total
  return {"dataset": name, "accuracy": accuracy, **data.mean_corruption_accuracy(accuracy)}


def corruption_dataset(run, choice: str) -> Optional[str]:
  if choice == "none":
    return None
  if choice == "auto":
    return run.config.data.name if run.config.data.name in CORRUPTED else None
  if choice not in CORRUPTED:
    raise ValueError(f"--corruption must be 'auto', 'none' or one of {CORRUPTED}, "
                     f"got {choice!r}.")
  return choice


# ----------------------------------------------------------------------------- plot
def plot(results, path: str) -> str:
  """Error increase vs noise frequency, one line per run."""
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for r in results:
    s = r["sweep"]
    ax.plot(s["freq"], np.asarray(s["error_increase"]) * 100, "o-", ms=3,
            label=f"{r['label']} (clean error {100 * s['clean_error']:.1f}%)")
  ax.axhline(0, color="0.6", lw=0.8)
  eps, bw = results[0]["eps"], results[0]["bandwidth"]
  ax.set(xlabel="noise frequency (x pi)", ylabel="error increase (%)",
         title=f"Robustness to band-limited noise (RMS {eps}, band {bw} pi)")
  ax.legend(fontsize=7)
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- main
def main(argv):
  del argv
  f = runs.FLAGS
  if f.num_freqs < 2 or f.eps <= 0 or not 0 < f.bandwidth <= 1 or f.noise_examples < 1:
    raise app.UsageError("Need --num_freqs >= 2, --eps > 0, 0 < --bandwidth <= 1 and "
                         "--noise_examples >= 1.")
  out = runs.output_dir(f.out, f.workdir)
  loaded = runs.load_runs(f.workdir, f.step)
  corrupted = [corruption_dataset(run, f.corruption) for run in loaded]  # validate first
  freqs = np.linspace(0.0, 1.0, f.num_freqs)
  results = []
  for run, corr in zip(loaded, corrupted):
    split = f.noise_split or runs.default_eval_split(run)
    batch_size = f.batch_size or min(int(run.config.eval_batch_size), f.noise_examples)
    name = runs.label(run, loaded)
    batches = list(runs.progress(runs.eval_batches(run, split, batch_size, f.noise_examples),
                                 -(-f.noise_examples // batch_size), f"{name} data"))
    sweep = frequency_sweep(run.model, run.variables, batches, freqs, eps=f.eps,
                            bandwidth=f.bandwidth, key=jax.random.PRNGKey(f.seed))
    res = dict(label=name, workdir=run.workdir, step=run.step, split=split, eps=f.eps,
               bandwidth=f.bandwidth, model_name=run.config.model_name, sweep=sweep)
    if corr:
      res["corruption"] = corruption_accuracy(run, corr, batch_size)
    results.append(res)
  summary = {"runs": results}
  if len(results) == 1:
    summary.update(results[0])
  print("wrote", runs.write_json(f"{out}/noise.json", summary))
  print("wrote", plot(results, f"{out}/noise.png"))
  for r in results:
    inc = " ".join(f"{100 * e:+.1f}" for e in r["sweep"]["error_increase"])
    print(f"{r['label']}: clean error {100 * r['sweep']['clean_error']:.1f}%, increase (%) "
          f"over f = 0..pi: {inc}" + (f"; mean corruption accuracy "
                                      f"{r['corruption']['mean_corruption_accuracy']:.3f}"
                                      if "corruption" in r else ""))


if __name__ == "__main__":
  app.run(main)
