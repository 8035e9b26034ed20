r"""Robustness to noise frequency ("How do ViTs work?", Section 3, Fig. 2b) and corruptions.

The figure is the error increase over clean images, `err(x + noise_f) - err(x)`, for noise
concentrated around frequency f, swept over [0, pi]; the slides' panel "(b) Robustness for noise
frequency" shows ViTs hurt little by high-frequency noise and ResNets much more. The same noise
(same seed) is used for every model so the curves compare. Two noises (`--variant`):

* `code` (default; what the slides' panel used): the authors' `FreqAttack` over their `Random`
  attack (xxxnell/how-do-vits-work, ops/adversarial.py): sign noise `eps * sign(N(0, 1))` per
  pixel and channel, 2D-FFT'd and shifted (`_shift`: a roll by half the size), its amplitude kept
  on the square ring between the centred squares of sides `2 int((f + s) n / 2 pi)` and
  `2 int((f - s) n / 2 pi)` (`_center_mask`, `_fourier_mask`; f in radians, half-width s = 0.2
  rad, `--ring_halfwidth`), shifted back, inverse FFT'd, the real part added to the image. Not
  renormalized: the ring's area grows with f, so high frequencies carry far more energy (at
  f = 0 the ring is 4 frequencies, a near-constant shift). Their code takes a square image (one
  size n); for H != W we apply their rule to each axis with its own size. Needs even H and W
  (as theirs: an odd size breaks their padding).
* `equal_energy` (ours): white Gaussian noise kept on the band `|omega|_inf / pi in
  [f - bandwidth / 2, f + bandwidth / 2]` (the same distance the Fourier analysis reads) and
  scaled to the L2 norm `eps * sqrt(H W C)` per image (eps = the per-pixel RMS), so every band
  carries the same energy; its f = 0 band is a constant colour shift.

eps is in the model's normalized input units (`Dataset.normalization`).

Corruptions: the mean accuracy, NLL and ECE (`analysis/calibration.py`) over the
`<corruption>_<severity>` splits of `cifar10_corrupted` / `cifar100_corrupted` (Fig. 12's
robustness), when the run trained on the clean set of that dataset and the corrupted files are
prepared (`--corruption=auto` does this for runs on those datasets and skips others; see
docs/data.md).

  python -m vitreg_jax.analysis.noise --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--variant=code|equal_energy] [--eps=0.5] [--num_freqs=11] [--ring_halfwidth=0.2]
      [--bandwidth=0.1] [--noise_examples=1000] [--noise_split=val_id] [--corruption=auto]
"""

import dataclasses
import functools
from typing import Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax import metrics
from vitreg_jax import plotting
from vitreg_jax.analysis import calibration
from vitreg_jax.analysis import runs


_FLAG_SPECS = [
    (flags.DEFINE_enum, "variant", "code", ["code", "equal_energy"], "code: the authors' "
     "ring-masked sign noise (FreqAttack); equal_energy: band noise of fixed energy (ours)."),
    (flags.DEFINE_float, "eps", 0.5, "code: sign-noise amplitude per pixel before the ring "
     "mask; equal_energy: noise RMS per pixel (normalized input units)."),
    (flags.DEFINE_integer, "num_freqs", 11, "Band centres, evenly spaced over [0, pi]."),
    (flags.DEFINE_float, "ring_halfwidth", 0.2,
     "code: ring half-width s in radians (theirs: 0.2)."),
    (flags.DEFINE_float, "bandwidth", 0.1, "equal_energy: band width in units of pi."),
    (flags.DEFINE_integer, "noise_examples", 1000, "Evaluation examples per frequency."),
    (flags.DEFINE_string, "noise_split", None, "Split (default: the run's first eval split)."),
    (flags.DEFINE_string, "corruption", "auto", "'auto' (the run's dataset if it is a "
     "corrupted one), 'none', or cifar10_corrupted / cifar100_corrupted."),
]


def define_flags() -> None:
  """This command's flags, defined when it runs (its `__main__`), not at import."""
  runs.define_flags(_FLAG_SPECS)


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
    raise errors.UserError(f"No frequency of a {shape[1]}x{shape[2]} image lies in the band {freq} "
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


def _shift(x):
  """The authors' `_shift` on `[B, H, W, C]`: a roll by half of each spatial size."""
  return jnp.roll(x, (x.shape[1] // 2, x.shape[2] // 2), axis=(1, 2))


def _centered(side: int, size: int) -> np.ndarray:
  """The authors' `_center_mask` along one axis: `side` ones, clamped to [0, size], centred."""
  side = min(max(side, 0), size)
  pad = (size - side) // 2
  return np.r_[np.zeros(pad), np.ones(side), np.zeros(pad)]


def ring_mask(h: int, w: int, freq: float, halfwidth: float = 0.2) -> np.ndarray:
  """The authors' `[h, w]` ring (shifted layout): the centred rectangle reaching `freq +
  halfwidth` radians minus the one reaching `freq - halfwidth` (each side `2 int(f n / 2 pi)`)."""
  if h % 2 or w % 2:
    raise errors.UserError(
        f"--variant=code needs even image sizes (the authors' centred mask), got "
        f"{h}x{w}; use --variant=equal_energy.")
  def square(f):
    side = lambda n: 2 * int(f * n / (2 * np.pi))  # int() truncates toward 0, as theirs
    return np.outer(_centered(side(h), h), _centered(side(w), w))
  return square(freq + halfwidth) - square(freq - halfwidth)


def ring_noise(key, shape, freq: float, halfwidth: float, eps: float) -> jax.Array:
  """The authors' `FreqAttack(Random(eps), f=freq * pi, s=halfwidth)` perturbation `[B, H, W,
  C]`: ring-masked sign noise, not renormalized (module docstring). `freq` in units of pi."""
  return _ring_noise_in(key, shape, ring_mask(shape[1], shape[2], freq * np.pi, halfwidth), eps)


def _ring_noise_in(key, shape, mask, eps):
  """Ring noise for a ring given as a `[H, W]` mask in the shifted layout (traceable)."""
  sign = eps * jnp.sign(jax.random.normal(key, shape))
  spec = _shift(jnp.fft.fft2(sign, axes=(1, 2))) * jnp.asarray(mask)[None, :, :, None]
  return jnp.real(jnp.fft.ifft2(_shift(spec), axes=(1, 2)))  # |X| masked, phase kept


def _warn_empty_rings(size, freqs, halfwidth: float) -> None:
  """Says which frequencies' rings hold no frequency of an `H x W` image (the authors' rule
  truncates the sides to even integers: small images lose their lowest rings)."""
  empty = [float(f) for f in freqs if not ring_mask(*size, f * np.pi, halfwidth).any()]
  if empty:
    print(f"warning: the ring of half-width {halfwidth} rad holds no frequency of a "
          f"{size[0]}x{size[1]} image at f = {', '.join(f'{f:.2f}' for f in empty)} (x pi): "
          "those points add no noise (the authors' rule; larger images fill them).")


@dataclasses.dataclass(frozen=True)
class Noise:
  """A noise variant (module docstring): `mask(shape, freq)` on the host, `draw(key, shape,
  mask)` traceable, so one compilation serves every frequency; `noise(key, shape, freq)`
  draws directly. `freq` in units of pi."""
  variant: str
  eps: float
  bandwidth: float = 0.1
  halfwidth: float = 0.2

  def mask(self, shape, freq: float) -> np.ndarray:
    if self.variant == "code":
      return ring_mask(shape[1], shape[2], freq * np.pi, self.halfwidth)
    return _checked_band(shape, freq, self.bandwidth)

  def draw(self, key, shape, mask):
    draw = _ring_noise_in if self.variant == "code" else _noise_in
    return draw(key, shape, mask, self.eps)

  def __call__(self, key, shape, freq: float):
    return self.draw(key, shape, self.mask(shape, freq))


def make_noise(variant: str, *, eps: float, bandwidth: float = 0.1, halfwidth: float = 0.2
               ) -> Noise:
  """The `Noise` of `variant` ('code' or 'equal_energy')."""
  if variant not in ("code", "equal_energy"):
    raise errors.UserError(f"--variant must be 'code' or 'equal_energy', got {variant!r}.")
  return Noise(variant, eps, bandwidth, halfwidth)


def make_accuracy(model, variables):
  """A jitted `f(images, labels) -> number correct` (a device scalar: add them up there)."""
  @jax.jit
  def correct(variables, images, labels):
    logits, _ = model.apply(variables, images, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels)
  return functools.partial(correct, variables)


def _make_noisy_accuracy(model, variables, noise_fn: Noise):
  """Jitted `f(images, labels, key, mask) -> number correct` on `images + noise`: the noise is
  drawn on the device, and its frequency mask is an argument, so every frequency shares one
  compilation."""
  @jax.jit
  def correct(variables, images, labels, key, mask):
    noisy = images + noise_fn.draw(key, images.shape, mask)
    logits, _ = model.apply(variables, noisy, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels)
  return functools.partial(correct, variables)


def frequency_sweep(model, variables, batches, freqs, *, noise_fn: Noise, key) -> dict:
  """Clean error and error under frequency noise (`noise_fn`, `make_noise`) at each frequency.

  Every batch's count stays on the device; the host reads them once, at the end.

  Args:
    batches: a list of `{'image', 'label'}` (reused for every frequency).
    freqs: band centres in units of pi.
  Returns:
    dict `freq`, `clean_error`, `error` (per freq), `error_increase` (per freq).
  """
  variables = jax.device_put(variables)
  batches = [jax.device_put({"image": b["image"], "label": b["label"]}) for b in batches]
  correct = make_accuracy(model, variables)
  noisy = _make_noisy_accuracy(model, variables, noise_fn)
  n = sum(len(b["label"]) for b in batches)
  clean = sum(correct(b["image"], b["label"]) for b in batches)
  hits = []
  for fi, freq in enumerate(freqs):
    band = noise_fn.mask(batches[0]["image"].shape, float(freq))
    hits.append(sum(noisy(b["image"], b["label"],
                          jax.random.fold_in(jax.random.fold_in(key, fi), bi), band)
                    for bi, b in enumerate(batches)))
  clean, hits = jax.device_get((clean, hits))
  clean = float(clean) / n
  errors = [1 - float(h) / n for h in hits]
  return dict(freq=[float(f) for f in freqs], clean_error=1 - clean, error=errors,
              error_increase=[e - (1 - clean) for e in errors], num_examples=n)


def corruption_accuracy(run, name: str, batch_size: int) -> dict:
  """Accuracy, NLL and ECE per corrupted split of dataset `name`, and their means over the
  splits (`mean_corruption_accuracy`, `mean_corruption_nll`, `mean_corruption_ece`: the
  authors' `robustness.ipynb` averages all three over the CIFAR-C splits)."""
  cfg = run.config.data.to_dict()
  cfg.update(name=name, eval_splits=None)
  dataset = data.open(cfg)  # fails here, with the preparation command, if files are missing
  splits = [s for s in dataset.info.splits if s.rpartition("_")[2] in {"1", "2", "3", "4", "5"}]
  predict = calibration.make_predict(run.model, run.variables)
  per_split = {split: calibration.split_metrics(run, split, batch_size, dataset=dataset,
                                                predict=predict)
               for split in runs.progress(splits, len(splits), f"{name} splits")}
  out = {"dataset": name}
  for metric in ("accuracy", "nll", "ece"):
    values = {split: m[metric] for split, m in per_split.items()}
    out.update({metric: values, **metrics.mean_corruption_accuracy(values, metric=metric)})
  return out


def corruption_dataset(run, choice: str) -> Optional[str]:
  if choice == "none":
    return None
  if choice == "auto":
    return run.config.data.name if run.config.data.name in CORRUPTED else None
  if choice not in CORRUPTED:
    raise errors.UserError(f"--corruption must be 'auto', 'none' or one of {CORRUPTED}, "
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
  r = results[0]
  what = (f"ring-masked sign noise, eps {r['eps']}, half-width {r['ring_halfwidth']} rad"
          if r["variant"] == "code" else
          f"equal-energy band noise, RMS {r['eps']}, band {r['bandwidth']} pi")
  ax.set(xlabel="noise frequency (x pi)", ylabel="error increase (%)",
         title=f"Robustness for noise frequency ({what})")
  ax.legend(fontsize=7)
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- main
def main(argv):
  del argv
  f = runs.FLAGS
  if (f.num_freqs < 2 or f.eps <= 0 or not 0 < f.bandwidth <= 1 or f.noise_examples < 1
      or f.ring_halfwidth <= 0):
    raise errors.UserError("Need --num_freqs >= 2, --eps > 0, 0 < --bandwidth <= 1, "
                         "--ring_halfwidth > 0 and --noise_examples >= 1.")
  noise_fn = make_noise(f.variant, eps=f.eps, bandwidth=f.bandwidth,
                        halfwidth=f.ring_halfwidth)
  out, loaded = runs.output_and_runs()
  corrupted = [corruption_dataset(run, f.corruption) for run in loaded]  # validate first
  freqs = np.linspace(0.0, 1.0, f.num_freqs)
  results = []
  for run, corr in zip(loaded, corrupted):
    split = f.noise_split or runs.default_eval_split(run)
    batch_size = f.batch_size or min(int(run.config.eval_batch_size), f.noise_examples)
    name = runs.label(run, loaded)
    batches = list(runs.progress(runs.eval_batches(run, split, batch_size, f.noise_examples),
                                 -(-f.noise_examples // batch_size), f"{name} data"))
    if f.variant == "code":  # an odd image size fails here, before the sweep
      _warn_empty_rings(batches[0]["image"].shape[1:3], freqs, f.ring_halfwidth)
    sweep = frequency_sweep(run.model, run.variables, batches, freqs, noise_fn=noise_fn,
                            key=jax.random.PRNGKey(f.seed))
    res = dict(label=name, workdir=run.workdir, step=run.step, split=split, eps=f.eps,
               variant=f.variant, bandwidth=f.bandwidth, ring_halfwidth=f.ring_halfwidth,
               model_name=run.config.model_name, sweep=sweep)
    if corr:
      res["corruption"] = corruption_accuracy(run, corr, batch_size)
    results.append(res)
  print("wrote", runs.write_summary(f"{out}/noise.json", results))
  print("wrote", plot(results, f"{out}/noise.png"))
  for r in results:
    inc = " ".join(f"{100 * e:+.1f}" for e in r["sweep"]["error_increase"])
    print(f"{r['label']}: clean error {100 * r['sweep']['clean_error']:.1f}%, increase (%) "
          f"over f = 0..pi: {inc}" + (f"; mean corruption accuracy "
                                      f"{r['corruption']['mean_corruption_accuracy']:.3f}, "
                                      f"NLL {r['corruption']['mean_corruption_nll']:.3f}, "
                                      f"ECE {r['corruption']['mean_corruption_ece']:.3f}"
                                      if "corruption" in r else ""))


if __name__ == "__main__":
  define_flags()
  app.run(runs.usage_errors(main))
