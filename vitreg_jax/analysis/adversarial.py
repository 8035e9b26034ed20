r"""Adversarial robustness: accuracy under FGSM and PGD ("How do ViTs work?", Section 1's
"ViTs are robust against ... adversarial attacks", the claim the slides open with).

The attacks are the authors' (xxxnell/how-do-vits-work, `ops/adversarial.py`, classes `FGSM`
and `PGD`, themselves after torchattacks), untargeted, L-infinity, on the cross-entropy of
the true label, the model in eval mode:

  FGSM:  x_adv = x + eps sign(grad_x CE(f(x), y))                        (their `FGSM.__call__`)
  PGD:   x_0 = x + U(-eps, eps) (random start), clamped to [0, 1];
         x_{t+1} = x + clip(x_t + alpha sign(grad_x CE(f(x_t), y)) - x, -eps, eps),
         `steps` times                                                     (their `PGD.__call__`)

with their defaults: FGSM `eps=0.007`; PGD `eps=0.3`, `alpha=2/255`, `steps=40`,
`random_start=True`. No code of theirs we read calls either class with other values
(`robustness.ipynb` imports the module in a commented-out line only), so the sweep's eps
list (`--attack_eps`) includes both defaults, and PGD keeps its `alpha` and `steps` at every
eps (as their class does; at eps < alpha a step reaches the ball's boundary at once).

Where the attack lives (`--attack_space`):

* `authors` (default): the tensor their attacks perturb is the model's *normalized* input
  (their `ops/datasets.py` loaders apply `Normalize(mean, std)` before any attack), so eps and
  alpha are in normalized units (here `Dataset.normalization`'s), nothing is clipped to the
  pixel range, and the random start is clamped to [0, 1] *of that tensor*, as their
  `torch.clamp(xs_adv, min=0, max=1)` does (a torchattacks line kept for [0, 1] inputs; the
  first step's projection brings the iterate back into the eps ball). These are the authors'
  budgets in pixels only for runs normalized as theirs (configs/how_vits_work.py uses their
  CIFAR mean / std); across runs of other normalizations, compare with `pixel`.
* `pixel`: Goodfellow et al.'s and Madry et al.'s convention (and torchattacks'): eps and alpha
  in [0, 1] pixel units (eps / std per channel in the model's input) and every iterate, the
  random start included, clipped to the valid pixel range [0, 1], i.e. to the normalized
  values of pixels 0 and 255 (`Normalization.host`, so clean images are never moved).

The attack's loss is the sum over the batch of the per-example cross-entropies (theirs: the
batch mean; the sign of the gradient is the same, and the sum keeps each example's attack
independent of the batch it is in). Their `n_ff` (an MC-dropout ensemble) is 1.

  python -m vitreg_jax.analysis.adversarial --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--attacks=fgsm,pgd] [--attack_eps=0,0.002,0.007,0.03,0.1,0.3]
      [--attack_space=authors|pixel] [--pgd_steps=40] [--pgd_alpha=0.00784]
      [--pgd_random_start=true] [--num_examples=500] [--split=val_id]

Writes `adversarial.json` (per run: `clean_accuracy`, and per attack `eps` and `accuracy`)
and `adversarial.png` (accuracy against eps, one panel per attack, runs overlaid, each run's
clean accuracy dashed).
"""

import dataclasses
import functools
from typing import Optional, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax import errors
from vitreg_jax import plotting
from vitreg_jax.analysis import fourier
from vitreg_jax.analysis import noise
from vitreg_jax.analysis import runs


ATTACKS = ("fgsm", "pgd")
SPACES = ("authors", "pixel")
DEFAULT_EPS = ("0", "0.002", "0.007", "0.03", "0.1", "0.3")

_FLAG_SPECS = [
    (flags.DEFINE_list, "attacks", list(ATTACKS), "Attacks to run: fgsm, pgd."),
    (flags.DEFINE_list, "attack_eps", list(DEFAULT_EPS), "L-inf radii (units: --attack_space); "
     "the authors' defaults are 0.007 (FGSM) and 0.3 (PGD)."),
    (flags.DEFINE_enum, "attack_space", "authors", list(SPACES), "authors: eps in the model's "
     "normalized input units, no pixel clipping (their code); pixel: eps in [0, 1] pixel "
     "units, iterates clipped to the pixel range."),
    (flags.DEFINE_integer, "pgd_steps", 40, "PGD iterations (the authors: 40)."),
    (flags.DEFINE_float, "pgd_alpha", 2 / 255, "PGD step size (the authors: 2/255)."),
    (flags.DEFINE_bool, "pgd_random_start", True,
     "PGD starts at a uniform point of the eps ball (the authors: yes)."),
]


def define_flags() -> None:
  """This command's flags, defined when it runs (its `__main__`), not at import: the shared
  analysis flags, Fourier's `--num_examples` / `--split` (the same eval examples) and this
  module's own."""
  fourier.define_flags()
  runs.define_once(_FLAG_SPECS)


# ----------------------------------------------------------------------------- attacks
@dataclasses.dataclass(frozen=True)
class Space:
  """Where an attack lives, in the model's normalized input: `scale` turns eps and alpha into
  those units (per channel), `bounds` are the valid-pixel range every iterate is clipped to
  (None: no clipping), `start_bounds` the range PGD's random start is clamped to."""
  name: str
  scale: tuple = (1.0,)
  bounds: Optional[tuple] = None
  start_bounds: Optional[tuple] = (0.0, 1.0)


def make_space(name: str, normalization) -> Space:
  """The `Space` named `name` ('authors' or 'pixel', module docstring) for a dataset's
  `Normalization` (its per-channel `mean` and `std` of [0, 1] images)."""
  if name == "authors":
    return Space("authors")
  if name != "pixel":
    raise errors.UserError(f"--attack_space must be one of {SPACES}, got {name!r}.")
  channels = len(normalization.std)
  lo = normalization.host(np.zeros((1, 1, channels), np.uint8)).reshape(-1)
  hi = normalization.host(np.full((1, 1, channels), 255, np.uint8)).reshape(-1)
  bounds = (tuple(float(v) for v in lo), tuple(float(v) for v in hi))
  return Space("pixel", tuple(1.0 / s for s in normalization.std), bounds, bounds)


def _clip(x, bounds):
  return x if bounds is None else jnp.clip(x, jnp.asarray(bounds[0]), jnp.asarray(bounds[1]))


def input_gradient(model, variables):
  """`g(images, labels)`: the gradient in the images of the summed cross-entropy of the true
  labels (eval mode), one example's gradient independent of the others."""
  def loss(images, labels):
    logits, _ = model.apply(variables, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
  return jax.grad(loss)


def fgsm(grad_fn, images, labels, eps, space: Space):
  """The authors' FGSM (`ops/adversarial.py`, `FGSM.__call__`): one signed-gradient step of
  size `eps` (in `space`'s units), clipped to `space.bounds`."""
  eps = eps * jnp.asarray(space.scale)
  return _clip(images + eps * jnp.sign(grad_fn(images, labels)), space.bounds)


def pgd(grad_fn, images, labels, eps, space: Space, *, alpha: float, steps: int, key=None):
  """The authors' PGD (`ops/adversarial.py`, `PGD.__call__`): with a `key`, a uniform random
  start in the eps ball clamped to `space.start_bounds`; then `steps` signed-gradient steps of
  size `alpha`, each projected onto the eps ball around `images` and clipped to
  `space.bounds` (eps and alpha in `space`'s units)."""
  scale = jnp.asarray(space.scale)
  eps, alpha = eps * scale, alpha * scale
  adv = images
  if key is not None:
    adv = _clip(images + eps * jax.random.uniform(key, images.shape, images.dtype, -1.0, 1.0),
                space.start_bounds)

  def step(_, adv):
    adv = adv + alpha * jnp.sign(grad_fn(adv, labels))
    adv = images + jnp.clip(adv - images, -eps, eps)
    return _clip(adv, space.bounds)
  return jax.lax.fori_loop(0, steps, step, adv)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The sweep: `attacks` (names in `ATTACKS`), `eps` (radii), the `space` and PGD's
  `alpha`, `steps` and `random_start`."""
  attacks: tuple
  eps: tuple
  space: Space
  alpha: float = 2 / 255
  steps: int = 40
  random_start: bool = True


def make_attacked_correct(model, variables, attack: str, settings: Settings):
  """A jitted `f(images, labels, eps, key) -> number correct` on `attack`'s adversarial images
  (a device scalar). The weights and eps are arguments of the compiled function, not
  constants in it, so every radius shares one compilation."""
  @jax.jit
  def correct(variables, images, labels, eps, key):
    grad_fn = input_gradient(model, variables)
    if attack == "fgsm":
      adv = fgsm(grad_fn, images, labels, eps, settings.space)
    else:
      adv = pgd(grad_fn, images, labels, eps, settings.space, alpha=settings.alpha,
                steps=settings.steps, key=key if settings.random_start else None)
    logits, _ = model.apply(variables, jax.lax.stop_gradient(adv), train=False)
    return jnp.sum(jnp.argmax(logits, -1) == labels)
  return functools.partial(correct, variables)


def robustness(model, variables, batches: Sequence[dict], settings: Settings, *, key) -> dict:
  """Clean accuracy and accuracy under each attack at each eps over `batches`.

  Args:
    batches: `{'image' (normalized), 'label'}` batches, reused for every attack and eps.
    key: PGD's random starts (folded in per eps and batch).
  Returns:
    dict `num_examples`, `clean_accuracy`, and `attacks`: per attack `{'eps', 'accuracy'}`.
  """
  variables = jax.device_put(variables)
  batches = [jax.device_put({"image": b["image"], "label": b["label"]}) for b in batches]
  n = sum(len(b["label"]) for b in batches)
  if not n:
    raise errors.UserError("No examples to attack: the split is empty.")
  clean = sum(noise.make_accuracy(model, variables)(b["image"], b["label"]) for b in batches)
  hits = {}
  for attack in settings.attacks:
    correct = make_attacked_correct(model, variables, attack, settings)
    hits[attack] = [
        sum(correct(b["image"], b["label"], jnp.float32(eps),
                    jax.random.fold_in(jax.random.fold_in(key, ei), bi))
            for bi, b in enumerate(batches))
        for ei, eps in enumerate(settings.eps)]
  clean, hits = jax.device_get((clean, hits))
  return dict(num_examples=n, clean_accuracy=float(clean) / n,
              attacks={a: dict(eps=[float(e) for e in settings.eps],
                               accuracy=[float(h) / n for h in hits[a]])
                       for a in settings.attacks})


# ----------------------------------------------------------------------------- plot
def plot(results, path: str) -> str:
  """Accuracy against eps, one panel per attack, runs overlaid (clean accuracy dashed)."""
  plt = plotting.pyplot()
  attacks = list(results[0]["attacks"])
  fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.6), squeeze=False)
  for ax, attack in zip(axes[0], attacks):
    for r in results:
      a = r["attacks"][attack]
      line, = ax.plot(a["eps"], np.asarray(a["accuracy"]) * 100, "o-", ms=3,
                      label=f"{r['label']} (clean {100 * r['clean_accuracy']:.1f}%)")
      ax.axhline(100 * r["clean_accuracy"], color=line.get_color(), ls="--", lw=0.8)
    positive = [e for e in results[0]["attacks"][attack]["eps"] if e > 0]
    if positive:
      ax.set_xscale("symlog", linthresh=min(positive))
      ax.set_xlim(0, max(positive) * 1.5)
    r = results[0]
    units = "normalized input" if r["attack_space"] == "authors" else "[0, 1] pixels"
    what = (f"PGD ({r['pgd_steps']} steps of {r['pgd_alpha']:.3g}"
            f"{', random start' if r['pgd_random_start'] else ''})" if attack == "pgd"
            else "FGSM")
    ax.set(xlabel=f"eps (L-inf, {units})", ylabel="accuracy (%)", ylim=(0, 101), title=what)
    ax.legend(fontsize=7)
  fig.tight_layout()
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- main
def _parse_eps(values: Sequence[str]) -> tuple:
  try:
    eps = tuple(float(v) for v in values)
  except ValueError:
    raise errors.UserError(f"--attack_eps must be numbers, got {','.join(values)!r}.") from None
  if not eps or min(eps) < 0 or not all(np.isfinite(eps)):
    raise errors.UserError(f"--attack_eps must be finite numbers >= 0, got {list(eps)}.")
  return eps


def checked_flags() -> tuple:
  """`(attacks, eps)` of the flags, each flag checked (`errors.UserError`)."""
  f = runs.FLAGS
  unknown = sorted(set(f.attacks) - set(ATTACKS))
  if unknown or not f.attacks:
    raise errors.UserError(f"--attacks must name some of {ATTACKS}, got {f.attacks}.")
  if f.pgd_steps < 1 or not f.pgd_alpha > 0:
    raise errors.UserError("Need --pgd_steps >= 1 and --pgd_alpha > 0.")
  eps = _parse_eps(f.attack_eps)
  return tuple(a for a in ATTACKS if a in f.attacks), eps


def settings_from_flags(normalization) -> Settings:
  """`Settings` of the (checked) flags for a run's input `normalization`."""
  f = runs.FLAGS
  attacks, eps = checked_flags()
  return Settings(attacks, eps, make_space(f.attack_space, normalization), f.pgd_alpha,
                  f.pgd_steps, f.pgd_random_start)


def main(argv):
  del argv
  checked_flags()  # before any run is read
  out, loaded = runs.output_and_runs("num_examples", "batch_size")
  f = runs.FLAGS
  results = []
  for run in loaded:
    settings = settings_from_flags(run.dataset.normalization)
    split = f.split or runs.default_eval_split(run)
    batch_size = f.batch_size or min(int(run.config.eval_batch_size), f.num_examples)
    name = runs.label(run, loaded)
    batches = list(runs.progress(runs.eval_batches(run, split, batch_size, f.num_examples),
                                 -(-f.num_examples // batch_size), f"{name} data"))
    res = robustness(run.model, run.variables, batches, settings,
                     key=jax.random.PRNGKey(f.seed))
    results.append(dict(label=name, workdir=run.workdir, step=run.step, split=split,
                        model_name=run.config.model_name, attack_space=f.attack_space,
                        normalization=dict(mean=list(run.dataset.normalization.mean),
                                           std=list(run.dataset.normalization.std)),
                        pgd_steps=f.pgd_steps, pgd_alpha=f.pgd_alpha,
                        pgd_random_start=f.pgd_random_start, **res))
  print("wrote", runs.write_summary(f"{out}/adversarial.json", results))
  print("wrote", plot(results, f"{out}/adversarial.png"))
  for r in results:
    print(f"{r['label']}: clean accuracy {r['clean_accuracy']:.4f}; " + "; ".join(
        f"{a} " + ", ".join(f"eps {e:g}: {acc:.4f}" for e, acc in zip(v["eps"], v["accuracy"]))
        for a, v in r["attacks"].items()))


if __name__ == "__main__":
  define_flags()
  app.run(runs.usage_errors(main))
