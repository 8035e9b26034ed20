r"""Calibration: NLL, ECE and the reliability diagram ("How do ViTs work?", predictive performance).

The paper reports, beside accuracy, the negative log-likelihood (NLL: the mean of
`-log p(y_i | x_i)` over the split) and the expected calibration error (ECE: examples binned by
their confidence, the predicted class's probability, into equal-width bins; `sum_b (n_b / N)
|acc_b - conf_b|`). The authors compute both in `ops/tests.py` (`test`, with `ece` and the
`reliability_diagram` plot) and average them over the CIFAR-C splits in `robustness.ipynb`.
Training already writes `nll` and `ece` for every eval split (`metrics.classification_metrics`);
this command draws the reliability diagram of a checkpoint, overlaying runs:

  python -m vitreg_jax.analysis.calibration --workdir=DIR [--workdir=DIR2 --out=OUT]
      [--calibration_split=SPLIT] [--bins=10] [--calibration_examples=N] [--step=N]

It writes `calibration.json` (per run: accuracy, NLL, ECE, and under `bins` the bin edges and
per bin the example count, mean confidence and accuracy) and `calibration.png` (the reliability diagram above, the
confidence histogram below). The corruption sets' NLL / ECE come from
`python -m vitreg_jax.analysis.noise` (`noise.corruption_accuracy`, which calls
`split_metrics` here).
"""

import functools
from typing import Iterable, Optional

from absl import app
from absl import flags
import jax
import numpy as np

from vitreg_jax import errors
from vitreg_jax import metrics
from vitreg_jax import plotting
from vitreg_jax.analysis import runs
from vitreg_jax.data import base
from vitreg_jax.data import splits as splits_lib
from vitreg_jax.training import steps


_FLAG_SPECS = [
    (flags.DEFINE_string, "calibration_split", None,
     "Split (default: the run's first eval split)."),
    (flags.DEFINE_integer, "bins", metrics.ECE_BINS,
     "Equal-width confidence bins (the authors: 10)."),
    (flags.DEFINE_integer, "calibration_examples", None,
     "Examples at most (default: the whole split)."),
]


def define_flags() -> None:
  """This command's flags, defined when it runs (its `__main__`), not at import."""
  runs.define_flags(_FLAG_SPECS)


def make_predict(model, variables):
  """A jitted `f(images, labels) -> steps.predictions` (pred, loss, confidence per example).

  The weights are an argument of the compiled function, not constants baked into it."""
  @jax.jit
  def predict(variables, images, labels):
    logits, _ = model.apply(variables, images, train=False)
    return steps.predictions(logits, labels)
  return functools.partial(predict, jax.device_put(variables))


def batch_metrics(predict, batches: Iterable[dict], num_bins: int) -> dict:
  """Accuracy, NLL, ECE and the reliability diagram (`metrics.reliability`) of `batches`.

  Per-batch results stay on the device until the end (one transfer); the bin counts add over
  batches (`metrics.calibration_counts`)."""
  outs, labels = [], []
  for b in batches:
    outs.append(predict(b["image"], b["label"]))
    labels.append(np.asarray(b["label"]))
  if not outs:
    raise errors.UserError("No examples to evaluate: the split is empty.")
  outs = jax.device_get(outs)
  counts, nll, hits, n = np.zeros((3, num_bins)), 0.0, 0, 0
  for out, label in zip(outs, labels):
    correct = out["pred"] == label
    counts += metrics.calibration_counts(out["confidence"], correct, num_bins=num_bins)
    nll += float(np.sum(out["loss"], dtype=np.float64))
    hits, n = hits + int(correct.sum()), n + len(label)
  bins = metrics.reliability(counts)
  return {"num_examples": n, "accuracy": hits / n, "nll": nll / n, "ece": bins.pop("ece"),
          "bins": bins}


def split_metrics(run, split: str, batch_size: int, *, num_bins: int = metrics.ECE_BINS,
                  max_examples: Optional[int] = None, dataset=None, predict=None,
                  desc: Optional[str] = None) -> dict:
  """`batch_metrics` of the run's checkpoint on `split` (of `dataset`, default the run's)."""
  predict = predict or make_predict(run.model, run.variables)
  batches = runs.eval_batches(run, split, batch_size, max_examples, dataset=dataset)
  if desc:
    batches = runs.progress(batches, None, desc)
  return batch_metrics(predict, batches, num_bins)


# ----------------------------------------------------------------------------- plot
def plot(results, path: str) -> str:
  """Reliability diagram (accuracy vs mean confidence per bin) over the confidence histogram."""
  plt = plotting.pyplot()
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                    gridspec_kw=dict(height_ratios=(3, 1.3)))
  top.plot([0, 1], [0, 1], ls=":", color="0.3", lw=1, label="perfect calibration")
  for r in results:
    c, bins = r["calibration"], r["calibration"]["bins"]
    full = [i for i, n in enumerate(bins["count"]) if n > 0]
    line, = top.plot([bins["confidence"][i] for i in full], [bins["accuracy"][i] for i in full],
                     "o-", ms=4, label=f"{r['label']} (ECE {100 * c['ece']:.1f}%, NLL "
                                       f"{c['nll']:.3f}, acc. {100 * c['accuracy']:.1f}%)")
    count = np.asarray(bins["count"])
    bottom.stairs(count / max(count.sum(), 1), bins["edges"], color=line.get_color(), lw=1.5)
  top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy",
          title=f"Reliability diagram ({results[0]['split']}, "
                f"{len(results[0]['calibration']['bins']['count'])} bins)")
  top.legend(fontsize=7, loc="upper left")
  bottom.set(xlabel="confidence (max softmax probability)", ylabel="fraction of examples",
             ylim=(0, 1))
  fig.tight_layout()
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


# ----------------------------------------------------------------------------- main
def _checked_split(run, split: Optional[str]) -> str:
  """`split` (default: the run's first eval split), a clear usage error if the run's dataset
  has no such split."""
  split = split or runs.default_eval_split(run)
  try:
    base.check_split(run.dataset.info, splits_lib.base_name(split))
  except errors.UserError as e:
    raise errors.UserError(f"--calibration_split: {e}") from None
  return split


def main(argv):
  del argv
  out, loaded = runs.output_and_runs("bins", "calibration_examples")
  f = runs.FLAGS
  splits = [_checked_split(run, f.calibration_split) for run in loaded]  # before any compute
  results = []
  for run, split in zip(loaded, splits):
    batch_size = f.batch_size or int(run.config.eval_batch_size or run.config.batch_size)
    name = runs.label(run, loaded)
    cal = split_metrics(run, split, batch_size, num_bins=f.bins,
                        max_examples=f.calibration_examples, desc=f"{name} {split}")
    results.append(dict(label=name, workdir=run.workdir, step=run.step, split=split,
                        model_name=run.config.model_name, calibration=cal))
  print("wrote", runs.write_summary(f"{out}/calibration.json", results))
  print("wrote", plot(results, f"{out}/calibration.png"))
  for r in results:
    c = r["calibration"]
    print(f"{r['label']} @{r['step']} {r['split']} ({c['num_examples']} examples): accuracy "
          f"{c['accuracy']:.4f}, NLL {c['nll']:.4f}, ECE {c['ece']:.4f} ({f.bins} bins)")


if __name__ == "__main__":
  define_flags()
  app.run(runs.usage_errors(main))
