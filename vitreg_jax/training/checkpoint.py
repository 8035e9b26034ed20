"""Checkpointing with orbax's CheckpointManager: periodic saves, keep-N, resume, preemption.

A checkpoint holds the whole training state pytree (step, params, optimizer state, model
state such as BatchNorm statistics, RNG) plus a small JSON record (`meta`) with the data
position and a fingerprint of the model config. Before restoring, the saved tree is compared
with the one the current config builds, so a checkpoint of another model fails with a message
naming the mismatching parameters instead of an opaque orbax error.

Saves are asynchronous and atomic (orbax writes `<step>.orbax-checkpoint-tmp*` and renames it
when complete). Resuming removes unfinished saves (a process killed during a save) and skips a
checkpoint that cannot be read (a truncated file, missing metadata), falling back to the newest
readable one; each is logged with the reason.

Preemption (SIGTERM on SLURM / GKE / TPU VMs): every process saves the same step, then the
loop exits cleanly (`Preemption`).
"""

import json
import signal
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from vitreg_jax import errors


class CheckpointMismatchError(errors.UserError):
  """The checkpoint in the workdir was written for a different model or optimizer."""


class CorruptCheckpointError(IOError):
  """A checkpoint's files are missing or unreadable."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the training state."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000,
               async_save: bool = True):
    self.directory = directory
    _log_unfinished_saves(directory)
    # Registering the handlers lets a fresh process read the saved tree's metadata
    # (for the mismatch check) before anything is restored.
    self.manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(save_every), 1), create=True,
            cleanup_tmp_directories=True,  # Unfinished saves (_log_unfinished_saves).
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

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
    """Restores `(state, meta)` at `step` (default: newest readable) into `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings (or concrete
    arrays); the result has the same structure and shardings. Without `step`, a checkpoint
    that cannot be read (truncated files, missing metadata, a save killed half-way) is
    skipped with a warning saying why, moved to `<directory>.skipped/<step>`, and the next
    older one is tried; None when no checkpoint is readable.

    Raises:
      CheckpointMismatchError: when the saved tree's keys or shapes differ (another model:
        a config error, not a damaged file, so no fallback).
    """
    if step is not None:
      return self._restore(step, abstract_state)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self._restore(step, abstract_state)
      except (CheckpointMismatchError, jax.errors.JaxRuntimeError, MemoryError):
        raise  # Another model, or the device failing (e.g. out of memory): not the files.
      except Exception as e:  # pylint: disable=broad-except  # tensorstore, json, OS errors.
        logging.warning("Skipping the checkpoint of step %d in %s: it cannot be read (%s: "
                        "%s). Falling back to an older one.", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        self._set_aside(step)
    return None

  def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    self._check_matches(step, abstract_state)
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of the manager's folder, so it is never listed again."""
    if jax.process_index() == 0:
      source = epath.Path(self.directory) / str(step)
      target = epath.Path(str(self.directory).rstrip("/") + ".skipped")
      target.mkdir(parents=True, exist_ok=True)
      if (target / str(step)).exists():
        (target / str(step)).rmtree()
      source.rename(target / str(step))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"vitreg_jax_skip_checkpoint_{step}")
    self.manager.reload()

  def _check_matches(self, step: int, abstract_state: Any) -> None:
    saved = self.manager.item_metadata(step)["state"]
    if saved is None:
      raise CorruptCheckpointError(f"checkpoint step {step} has no readable state metadata")
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


def _log_unfinished_saves(directory: str) -> None:
  """Names the unfinished saves of a killed process (orbax's cleanup_tmp_directories removes them).

  orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it only once complete, so
  an unfinished save is never listed as a step: resuming starts from the newest complete one.
  """
  root = epath.Path(directory)
  if jax.process_index() != 0 or not root.exists():
    return
  for path in sorted(root.glob("*.orbax-checkpoint-tmp*")):
    logging.warning("Removing the unfinished checkpoint save %s: the process stopped before "
                    "this save completed (killed during an asynchronous save). Resuming from "
                    "the newest complete checkpoint.", path)


class Preemption:
  """SIGTERM (a preemption notice) -> every process saves the same step, then stops.

  One process: a Python SIGTERM handler sets a flag that `reached(step)` returns.
  Several processes (`jax.distributed.initialize` was called): JAX's preemption sync manager
  catches SIGTERM itself (its handler is installed by `jax.distributed.initialize`), tells the
  other processes through the coordination service, and `reached(step)` (orbax's
  `reached_preemption`, i.e. `multihost_utils.reached_preemption_sync_point`) becomes True on
  every process at the same step, one past the largest step any process had reached. No
  Python handler is installed then: it would replace JAX's, so the other processes would never
  hear of the signal and the process acting alone would hang the collectives of the others.
  `reached(step)` must be called at every step, on every process.
  """

  def __init__(self, checkpointer: "Checkpointer"):
    self.checkpointer = checkpointer
    self.requested = False
    self._previous = None
    self._multiprocess = False

  def install(self):
    self._multiprocess = jax.process_count() > 1
    if self._multiprocess:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # Not in the main thread (e.g. some test runners): polling still works.
      logging.warning("Could not install the SIGTERM handler outside the main thread.")
    return self

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop (the same answer on every process)."""
    if self._multiprocess:
      return self.checkpointer.reached_preemption(step)
    return self.requested

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
