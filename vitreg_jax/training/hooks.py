"""The training loop's extension points: `Hook`, called at fixed points of `train.py`'s loop.

Extra behaviour of a run (JTT's error set, the regularizer balance check, the per-head
evaluation, or a user's own) is a `Hook` in a list, not a branch in the loop. A hook
overrides the points it needs; each is a no-op by default:

* `prepare(config)`: right after the config is resolved, before anything reads the data or
  the workdir (JTT writes the error set its sampler reads here);
* `on_start(run)`: once the run is built and its state restored, before the first step
  (`Run` says what a hook may read);
* `before_step(step, state, batch)`: before the update that makes `step` (1-based count);
* `after_step(step, state, batch, logged) -> figures or None`: after it, with the new state;
  `logged` says whether the loop writes this step's train line; the figures a hook returns
  go into that line (`train/<name>` in TensorBoard and metrics.jsonl);
* `on_eval(step, state)`: after each evaluation (mid-run and final).

`train.train_and_evaluate(config, workdir, hooks=[...])` runs a user's hooks after the
built-in ones (train.py's `default_hooks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Run:
  """What a hook may read about the run (`Hook.on_start`)."""
  config: Any            # the resolved config
  workdir: str
  dataset: Any           # the opened dataset (`data.open(config.data)`)
  model: Any
  objective: Any         # `objective.Objective`
  mesh: Any
  train_mask: Any        # the training head mask (None: all heads)
  normalize: Callable    # uint8 images -> the model's input (`dataset.normalization`)
  start_step: int        # the step the run starts or resumes at
  total_steps: int


class Hook:
  """Extra behaviour at the loop's fixed points (module docstring); subclass and override."""

  def prepare(self, config) -> None:
    """Before anything reads the data or the workdir."""

  def on_start(self, run: Run) -> None:
    """Once the run is built and its state restored, before the first step."""

  def before_step(self, step: int, state, batch) -> None:
    """Before the update that makes `step`."""

  def after_step(self, step: int, state, batch, logged: bool) -> dict | None:
    """After it; returns figures for this step's train line (written when `logged`)."""
    del step, state, batch, logged
    return None

  def on_eval(self, step: int, state) -> None:
    """After each evaluation."""


class Hooks(list):
  """A list of hooks, called in order at each point (`after_step` merges their figures)."""

  def prepare(self, config) -> None:
    for hook in self:
      hook.prepare(config)

  def on_start(self, run: Run) -> None:
    for hook in self:
      hook.on_start(run)

  def before_step(self, step: int, state, batch) -> None:
    for hook in self:
      hook.before_step(step, state, batch)

  def after_step(self, step: int, state, batch, logged: bool) -> dict | None:
    figures = {}
    for hook in self:
      figures.update(hook.after_step(step, state, batch, logged) or {})
    return figures or None

  def on_eval(self, step: int, state) -> None:
    for hook in self:
      hook.on_eval(step, state)
