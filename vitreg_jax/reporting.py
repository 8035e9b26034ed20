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
import os
import time

from absl import logging
import jax
import numpy as np

from vitreg_jax import inflight

# Steps the host may dispatch ahead of the device (each queued step holds a batch).
STEPS_IN_FLIGHT = 3


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient."""


class JsonlWriter:
  """Appends `{"step", "split", **metrics}` lines to workdir/metrics.jsonl (process 0)."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, step: int, split: str, metrics: dict):
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), "split": split,
                            **{k: float(v) for k, v in metrics.items()}}) + "\n")


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
        workdir, just_logging=jax.process_index() > 0, asynchronous=False)
    if start_step == 0:
      self.writer.write_hparams({k: v for k, v in config.to_dict().items()
                                 if isinstance(v, (int, float, str, bool))})
    self.jsonl = JsonlWriter(workdir)
    self.hooks = [periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=self.writer, every_steps=config.log_every_steps)]
    if config.profile and jax.process_index() == 0:
      self.hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
    self.log_every, self.total_steps = config.log_every_steps, total_steps
    self.schedule, self.checkpointer = schedule, checkpointer
    self._start = time.time()
    self._monitor = inflight.StepMonitor(max_in_flight=STEPS_IN_FLIGHT)

  def train(self, step: int, measured: dict) -> None:
    """Takes the measurements of `step` (1-based count); writes the summary on schedule."""
    self._monitor.record(step, measured)  # No host sync.
    for hook in self.hooks:
      hook(step)
    if step % self.log_every == 0 or step == self.total_steps:
      self.check_finite()
      logged = self._monitor.take_log()
      summary = {k: float(np.mean([m[k] for m in logged])) for k in logged[0] if k != "finite"}
      summary["lr"] = float(self.schedule(step - 1))
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
