"""An analysis defined outside vitreg_jax: the mean margin between the two largest logits of
a run's checkpoint on one eval split, for one run or several overlaid in one JSON.

  python logit_margin.py --workdir=RUN [--workdir=RUN2 --out=DIR] [--margin_split=val_ood]

docs/design.md, "How to add an analysis", shows this file; tests/extension_test.py runs it.
"""
from absl import app
from absl import flags
import jax
import numpy as np

from vitreg_jax.analysis import runs


def define_flags():
  """This command's flags, defined when it runs (never at import)."""
  runs.define_flags()  # --workdir (repeatable), --step, --out, --batch_size, --seed
  if 'margin_split' not in flags.FLAGS:
    flags.DEFINE_string('margin_split', None, "Eval split (default: the run's first).")


def mean_margin(run, split: str, batch_size: int) -> float:
  """The analysis itself: a pure function of the run's model, weights and data."""
  logits = jax.jit(lambda x: run.model.apply(run.variables, x)[0])
  margins = []
  for batch in runs.eval_batches(run, split, batch_size):
    top2 = np.sort(np.asarray(logits(batch['image'])), axis=-1)[:, -2:]
    margins.append(top2[:, 1] - top2[:, 0])
  return float(np.concatenate(margins).mean())


def main(argv):
  del argv
  f = flags.FLAGS
  out = runs.output_dir(f.out, f.workdir)    # mistakes are errors.UserError: one line
  loaded = runs.load_runs(f.workdir, f.step)
  results = []
  for run in loaded:
    split = f.margin_split or runs.default_eval_split(run)
    results.append({'label': runs.label(run, loaded), 'step': run.step, 'split': split,
                    'margin': mean_margin(run, split, f.batch_size or 64)})
  print('wrote', runs.write_summary(f'{out}/logit_margin.json', results))


if __name__ == '__main__':
  define_flags()
  app.run(runs.usage_errors(main))
