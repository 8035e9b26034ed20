"""Checkpointing with orbax's CheckpointManager: periodic saves, keep-N, resume, preemption.

A checkpoint holds the whole training state pytree (step, params, optimizer state, model
state such as BatchNorm statistics, RNG) plus a small JSON record (`meta`) with the data
position and a fingerprint of the model config. Before restoring, the saved tree is compared
with the one the current config builds, so a checkpoint of another model fails with a message
naming the mismatching parameters instead of an opaque orbax error.

Saves are asynchronous; SIGTERM (a preemption on SLURM / GKE / TPU VMs) sets a flag that the
training loop polls, so it saves the current step and exits cleanly.
"""

import json
import signal
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written for a different model or optimizer."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the training state."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True):
    self.directory = directory
    # Registering the handlers lets a fresh process read the saved tree's metadata
    # (for the mismatch check) before anything is restored.
    self.manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(save_every), 1), create=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves if `step` is on the save interval (or `force`); returns whether it saved.

    A step that is already saved (e.g. the final step on the save interval) is not
    written twice.
    """
    if step in self.manager.all_steps():
      return False
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores `(state, meta)` at `step` (default: latest) into `abstract_state`'s layout.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (or concrete
    arrays); the result has the same structure and shardings.

    Raises:
      CheckpointMismatchError: when the saved tree's keys or shapes differ.
    """
    step = self.latest_step() if step is None else step
    self._check_matches(step, abstract_state)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def _check_matches(self, step: int, abstract_state: Any) -> None:
    saved = self.manager.item_metadata(step)["state"]
    if saved is None:
      raise CheckpointMismatchError(
          f"Checkpoint step {step} in {self.directory} has no readable state metadata; it "
          "may be truncated. Delete that step's folder to resume from an earlier one.")
    want = _shapes_by_path(abstract_state)
    have = _shapes_by_path(saved)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
      lines = [f"The checkpoint at step {step} in {self.directory} does not match the "
               "model/optimizer built from this config."]
      if missing:
        lines.append(f"  missing in checkpoint: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
      if extra:
        lines.append(f"  only in checkpoint: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
      for k in wrong[:10]:
        lines.append(f"  shape of {k}: checkpoint {have[k]} vs config {want[k]}")
      lines.append("Use the config the checkpoint was written with, or a fresh --workdir "
                   "(use config.init_from to start a new model from these weights).")
      raise CheckpointMismatchError("\n".join(lines))

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def run_meta(config, step: int) -> dict:
  """The JSON record saved next to the state: the data position and the model's config."""
  return {"data_step": int(step), "model_name": config.model_name,
          "model": json.dumps(config.model.to_dict(), sort_keys=True, default=str)}


def _shapes_by_path(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
  out = {}
  for path, leaf in flat:
    if leaf is None:
      continue
    out[jax.tree_util.keystr(path, simple=True, separator="/")] = tuple(np.shape(leaf))
  return out


class PreemptionFlag:
  """Turns SIGTERM into a flag the training loop polls (save, then exit)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # Not in the main thread (e.g. some test runners): polling still works.
      logging.warning("Could not install the SIGTERM handler outside the main thread.")
    return self

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self.requested = True

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()
