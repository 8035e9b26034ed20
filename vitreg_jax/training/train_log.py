"""Where a run's measurements go, and the check that every step was finite.

`Reporter` receives each train step's measurements (device arrays, still in flight) and each
evaluation's metrics. Every `config.log_every_steps` it averages the train measurements and
writes them, with the learning rate, to clu's writers (TensorBoard events + the log) and to
`WORKDIR/metrics.jsonl`, one JSON object per line, `{"step", "split", **metrics}`, that a
report can read back. Nothing a step returns is read on the host per step: the first
non-finite step is recorded on the device (`inflight.StepMonitor`) and read at logging and
checkpoint time, so several steps stay in flight; a non-finite step stops the run with
`NonFiniteLossError` naming it.
"""

import json
import time

from absl import logging
from etils import epath
import jax
import numpy as np

from vitreg_jax.training import inflight
from vitreg_jax.training import rundir

# Steps the host may dispatch ahead of the device (each queued step holds a batch).
STEPS_IN_FLIGHT = 3
METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient."""


class JsonlWriter:
  """Writes `{"step", "split", **metrics}` lines to workdir/metrics.jsonl (process 0).

  (`name` picks another file of the same kind, e.g. the heads' `heads_eval.jsonl`.)

  A run that resumes at `start_step` first drops the lines past that step: they were written
  after the checkpoint it resumes from and will be written again, so each (step, split)
  appears once. A last line cut short by a crash is dropped too.

  The workdir may be any `etils.epath` path (`gs://...`). A local file is appended to; object
  stores cannot append, so there the file is rewritten whole (from the lines kept in memory)
  at each write, through a temporary file and a rename.
  """

  def __init__(self, workdir, start_step: int = 0, name: str = METRICS_FILE):
    self.path = epath.Path(workdir) / name
    self.enabled = jax.process_index() == 0
    self._append = "://" not in str(self.path)
    self._lines = []
    if self.enabled and self.path.exists():
      text = self.path.read_text()
      self._lines = _lines_up_to(text.splitlines(keepends=True), start_step)
      if "".join(self._lines) != text:
        logging.info("%s: kept the %d lines up to the restored step %d, dropped the rest.",
                     self.path, len(self._lines), start_step)
        self._rewrite()

  def write(self, step: int, split: str, metrics: dict):
    self.write_records([{"step": int(step), "split": split,
                         **{k: float(v) for k, v in metrics.items()}}])

  def write_records(self, records: list[dict]):
    """Writes one JSON line per record (each holds its "step")."""
    if not self.enabled:
      return
    lines = [json.dumps(r) + "\n" for r in records]
    self._lines += lines
    if self._append:
      with self.path.open("a") as f:
        f.writelines(lines)
    else:
      self._rewrite()

  def _rewrite(self):
    rundir.write_text(self.path, "".join(self._lines))  # Atomic: never half-written.


def _lines_up_to(lines: list[str], step: int) -> list[str]:
  """The complete JSON lines of `lines` whose step is at most `step`."""
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # Cut short by a crash (or blank).
    if int(record["step"]) <= step:
      kept.append(line.rstrip("\n") + "\n")
  return kept


def event_logdir(workdir) -> str | None:
  """`workdir` if TensorBoard's writer can write there, else None (with a warning).

  clu's summary writer writes through TensorFlow's file system, which knows local paths and
  `gs://` but not every scheme `etils.epath` does (`s3://` needs tensorflow-io; a scheme
  registered with `epath.register_path_cls` is unknown to it). Rather than fail, or write the
  events somewhere else, such a run writes no events: metrics.jsonl holds the same figures.
  """
  workdir = str(workdir)
  if "://" not in workdir:
    return workdir
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.io.gfile.exists(workdir)
  except tf.errors.UnimplementedError:
    logging.warning(
        "No TensorBoard events for %s: TensorFlow's file system cannot write %s:// paths. "
        "metrics.jsonl, config.json and the checkpoints are written there as usual; for "
        "events, use a local or gs:// workdir (or install tensorflow-io for s3://).",
        workdir, workdir.split("://")[0])
    return None
  return workdir


class Reporter:
  """Train summaries, eval metrics, progress and profiling hooks, and the finiteness check.

  Args:
    workdir: the run's workdir (events and metrics.jsonl).
    config: the resolved config (`log_every_steps`, `profile`, hparams).
    total_steps: the run's length (progress reporting, the last summary).
    start_step: the step the run starts or resumes at (hparams are written on a fresh run).
    schedule: the learning-rate schedule, logged as `train/lr`.
    checkpointer: named in the non-finite error (the last good checkpoint).
  """

  def __init__(self, workdir, config, *, total_steps, start_step, schedule, checkpointer):
    from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
    self.writer = metric_writers.create_default_writer(
        event_logdir(workdir), just_logging=jax.process_index() > 0, asynchronous=False)
    if start_step == 0:
      self.writer.write_hparams({k: v for k, v in config.to_dict().items()
                                 if isinstance(v, (int, float, str, bool))})
    self.jsonl = JsonlWriter(workdir, start_step)
    self.hooks = [periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=self.writer, every_steps=config.log_every_steps)]
    if config.profile and jax.process_index() == 0:
      self.hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
    self.log_every, self.total_steps = config.log_every_steps, total_steps
    self.schedule, self.checkpointer = schedule, checkpointer
    self._start = time.time()
    self._monitor = inflight.StepMonitor(max_in_flight=STEPS_IN_FLIGHT)

  def is_log_step(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total_steps

  def train(self, step: int, measured: dict, extra: dict | None = None) -> None:
    """Takes the measurements of `step` (1-based count); writes the summary on schedule.

    `extra`: figures the loop's hooks measured at a log step (`loss_balance`:
    `balance/<name>`), written in the same line.
    """
    self._monitor.record(step, measured)  # No host sync.
    for hook in self.hooks:
      hook(step)
    if self.is_log_step(step):
      self.check_finite()
      logged = self._monitor.take_log()
      summary = {k: float(np.mean([m[k] for m in logged])) for k in logged[0] if k != "finite"}
      summary["lr"] = float(self.schedule(step - 1))
      summary.update({k: float(v) for k, v in (extra or {}).items()})
      # Wall time of this session's loop (compilation and evals included); it restarts at 0
      # on resume, which the report accounts for when it sums time to a target accuracy.
      summary["elapsed_s"] = time.time() - self._start
      self.writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
      self.jsonl.write(step, "train", summary)

  def check_finite(self) -> None:
    """Raises `NonFiniteLossError` unless every step so far was finite (call before saving)."""
    self._monitor.check(self._raise)

  def _raise(self, step, measured):
    self.checkpointer.wait()
    values = "" if measured is None else (
        f" (loss={float(measured['loss'])}, grad_norm={float(measured['grad_norm'])})")
    raise NonFiniteLossError(
        f"Non-finite loss or gradient at step {step}{values}. Training stopped; the last good "
        f"checkpoint (step {self.checkpointer.latest_step()}) is kept in "
        f"{self.checkpointer.directory}. Lower config.optimizer.lr, add "
        "config.optimizer.grad_clip_norm, or check the data.")

  def eval(self, step: int, results: dict) -> None:
    """Writes `{split: metrics}` of an evaluation at `step`."""
    for split, metrics in results.items():
      self.writer.write_scalars(step, {f"{split}/{k}": v for k, v in metrics.items()})
      self.jsonl.write(step, split, metrics)

  def final(self, step: int, results: dict) -> None:
    """Prints the final metrics (process 0) and flushes the writers."""
    self.writer.flush()
    if jax.process_index() != 0:
      return
    for split, metrics in results.items():
      line = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items())
      print(f"[final] step {step} {split}: {line}", flush=True)
      logging.info("[final] step %d %s: %s", step, split, line)
