"""Command-line plumbing shared by the analyses: which runs, which batches, where outputs go.

The analysis maths lives in `hessian.py` (with `objective.py`, `operators.py`,
`spectrum.py`), `fourier.py` and `noise.py` as pure functions of
`(model, variables, batch)`; this module only turns the common flags into those arguments:

  --workdir=DIR (repeatable: overlay several runs in one plot)
  --step=N      (repeatable: several checkpoints of each run; default the newest)
  --out=DIR     (default: the single workdir; required with several workdirs)
  --batch_size  (default: the run's eval_batch_size for eval data, batch_size for training data)

Runs are rebuilt with `vitreg_jax.training.rundir.load_run` (saved config.json + orbax checkpoint), so
any checkpoint, including one initialised from a public `.npz`, is analysed the same way.
Every input is checked (workdirs, checkpoints, output folder) before any compute is spent.
"""

import json
import os
from typing import Iterable, Iterator, Optional, Sequence

import functools

from absl import flags
from etils import epath
import jax
import tqdm

from vitreg_jax import errors
from vitreg_jax import sharding
from vitreg_jax.data import mixing
from vitreg_jax.training import rundir

FLAGS = flags.FLAGS


# The commands' flags are defined by `define_once` below on their behalf: absl credits a flag to
# the first module on the stack that has not disclaimed, so a command's own flags stay in its
# `--help` (the shared ones below name this module explicitly).
flags.disclaim_key_flags()


def define_once(specs: Sequence[tuple], **kwargs) -> None:
  """Defines each `(flags.DEFINE_x, name, *args)` of `specs` as `DEFINE_x(name, *args,
  **kwargs)`, unless a flag of that name exists already: a command's `define_flags` runs once
  per process in use, but tests call several commands' mains (and so their `define_flags`) in
  one process."""
  for define, name, *args in specs:
    if name not in FLAGS:
      define(name, *args, **kwargs)


def define_flags(own: Sequence[tuple] = ()) -> None:
  """The flags every analysis command shares (above), then the command's `own` specs (as
  `define_once` takes them): called by each command's `define_flags` when it runs, not at
  import; each flag only once per process."""
  define_once([
      (flags.DEFINE_multi_string, "workdir", None,
       "Training run directory (repeat to overlay runs)."),
      (flags.DEFINE_multi_integer, "step", None,
       "Checkpoint step(s) to analyse (default: newest)."),
      (flags.DEFINE_string, "out", None,
       "Output folder (default: the workdir, when there is one)."),
      (flags.DEFINE_integer, "batch_size", None,
       "Examples per batch (default: from the run's config)."),
      (flags.DEFINE_integer, "seed", 0,
       "Seed of the random vectors / noise and of the data order."),
  ], module_name=__name__)
  define_once(own)


def check_at_least_one(*names: str) -> None:
  """`errors.UserError` unless each named integer flag is >= 1 (an optional one left unset,
  None, passes): `--NAME must be >= 1.` for one name, `Need --A >= 1 and --B >= 1.` for
  several."""
  if any(getattr(FLAGS, n) is not None and getattr(FLAGS, n) < 1 for n in names):
    if len(names) == 1:
      raise errors.UserError(f"--{names[0]} must be >= 1.")
    raise errors.UserError("Need " + " and ".join(f"--{n} >= 1" for n in names) + ".")


def output_and_runs(*at_least_one: str) -> tuple:
  """How every analysis command starts: the integer flags named in `at_least_one` checked
  (`check_at_least_one`), then `(output folder, loaded runs)` of the shared flags (`--out`,
  `--workdir`, `--step`), all before any compute."""
  check_at_least_one(*at_least_one)
  out = output_dir(FLAGS.out, FLAGS.workdir)
  return out, load_runs(FLAGS.workdir, FLAGS.step)


def load_runs(workdirs: Sequence[str], steps: Optional[Sequence[int]] = None) -> list:
  """`rundir.Run`s for every (workdir, step) pair; steps default to each run's newest."""
  if not workdirs:
    raise errors.UserError("Pass at least one --workdir=DIR (a training run's directory).")
  runs = []
  for workdir in workdirs:
    for step in (steps or [None]):
      runs.append(rundir.load_run(workdir, step))
  return runs


def usage_errors(main):
  """`main` with the mistakes a user can make (a missing or wrong --workdir, a bad flag value:
  `errors.UserError`) printed as one line, exit status 1; a bug keeps its traceback."""
  @functools.wraps(main)
  def wrapped(argv):
    with errors.exit_on_user_error():
      return main(argv)
  return wrapped


def label(run, runs: Sequence) -> str:
  """Legend label: the run's folder name, plus its step when several steps are compared."""
  name = os.path.basename(os.path.normpath(run.workdir))
  steps = {r.step for r in runs if r.workdir == run.workdir}
  return f"{name} @{run.step}" if len(steps) > 1 or len(runs) == 1 else name


def output_dir(out: Optional[str], workdirs: Sequence[str]) -> str:
  """`--out`, or the one workdir; a clear error when several workdirs share no `--out`."""
  if not workdirs:
    raise errors.UserError("Pass at least one --workdir=DIR (a training run's directory).")
  if out is None:
    if len(set(workdirs)) > 1:
      raise errors.UserError("Several --workdir values are overlaid in one plot: pass --out=DIR "
                             "for the combined JSON and PNG.")
    out = workdirs[0]
  epath.Path(out).mkdir(parents=True, exist_ok=True)  # `gs://` outputs work too.
  return out


def progress(iterable: Iterable, total: Optional[int], desc: str) -> Iterator:
  """A progress bar on stderr (tqdm)."""
  return iter(tqdm.tqdm(iterable, total=total, desc=desc, dynamic_ncols=True))


def train_batches(run, batch_size: int, num_batches: int, seed: int) -> Iterator[dict]:
  """`num_batches` training batches of the run's data, with its training augmentation.

  Images are normalized here (the pipeline yields uint8): the analyses are pure functions of
  the model's float input (the noise analysis adds its noise in those units). With
  `data.mixup` the batches keep their Mixup/CutMix recipe (`mix_*`), applied by the loss
  (`objective.Objective.inputs`) as the train step applies it."""
  it = run.dataset.train_iterator(global_batch_size=batch_size, seed=seed, process_index=0,
                                  process_count=1)
  normalize = run.dataset.normalization.host
  for _ in range(num_batches):
    batch = next(it)
    yield {"image": normalize(batch["image"]), "label": batch["label"],
           **{k: batch[k] for k in mixing.BATCH_KEYS if k in batch}}


def eval_batches(run, split: str, batch_size: int, max_examples: Optional[int] = None,
                 dataset=None) -> Iterator[dict]:
  """Batches of `split` of `dataset` (default: the run's) with eval preprocessing and
  normalized images, padding dropped, at most `max_examples` (`Dataset.stream_split`)."""
  dataset = dataset or run.dataset
  normalize = dataset.normalization.host
  for batch in dataset.stream_split(split, batch_size=batch_size, max_examples=max_examples):
    yield {"image": normalize(batch["image"]), "label": batch["label"]}


def default_eval_split(run) -> str:
  """The first eval split of the run (its in-distribution validation or test split)."""
  return run.dataset.eval_splits[0]


def shard_batch(batch: dict, mesh) -> dict:
  """Splits the batch over the mesh's data axis (clear error when it does not divide)."""
  sharding.check_batch_divisible(len(batch["label"]), mesh)
  return sharding.to_global(batch, mesh)


def replicate(tree, mesh):
  return jax.device_put(tree, sharding.replicated(mesh))


def write_json(path: str, obj) -> str:
  rundir.write_text(path, json.dumps(obj, indent=1))
  return path


def write_summary(path: str, results: list) -> str:
  """Writes an analysis' results as JSON to `path`: `{"runs": results}`, and with one run its
  fields also at the top level (`json["calibration"]` rather than `json["runs"][0][...]`).
  Returns `path`."""
  summary = {"runs": results}
  if len(results) == 1:
    summary.update(results[0])
  return write_json(path, summary)
