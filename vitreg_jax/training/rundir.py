"""A run's workdir as a self-describing record: its resolved config, checkpoints and model.

Every training run writes its full resolved config (`config_lib.with_defaults`) to
`WORKDIR/config.json` at start, so that `--workdir` alone is enough for head selection, the
analyses and the report to rebuild the model, the data and the splits:

    run = rundir.load_run(workdir)          # newest checkpoint; step=... for another one
    logits, out = run.model.apply(run.variables, images, head_mask=...)

Nothing here imports the training loop or TensorFlow: the model, checkpoint and config are
read with flax, orbax and ml_collections only (the dataset info is read on demand by `info`).
"""

import dataclasses
import functools
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vitreg_jax import config_lib
from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax import models
from vitreg_jax.training import run_files


def write_text(path, text: str) -> None:
  """Writes `text` to `path` (any `etils.epath` path) through a temporary file and a rename,
  so a reader never sees a half-written file."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _to_json(value):
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def config_to_json(config) -> str:
  """The config as stable JSON (sorted keys; tuples and arrays become lists)."""
  return json.dumps(_to_json(config), indent=2, sort_keys=True)


def save_config(config, workdir: str) -> str:
  """Writes the resolved `config` to `workdir/config.json` (process 0 only); returns the path."""
  path = run_files.config_path(workdir)
  if jax.process_index() == 0:
    write_text(path, config_to_json(config) + "\n")
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in `workdir`.

  Raises:
    FileNotFoundError: naming the expected file, when `workdir` holds no saved config.
  """
  path = epath.Path(run_files.config_path(workdir))
  if not path.exists():
    raise errors.PathNotFoundError(
        f"{path} not found: {workdir!r} is not a vitreg_jax run directory (runs write their "
        "config there at start). Pass the --workdir of a training run.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_state_tree(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """The saved training-state pytree of `step` (default: newest) as NumPy arrays.

  Returns:
    `(tree, step)`, `tree` with keys `step, params, opt_state, model_state, rng`.
  """
  steps = run_files.checkpoint_steps(workdir)
  if not steps or (step is not None and step not in steps):
    raise errors.PathNotFoundError(
        f"No checkpoint {'' if step is None else step} under "
        f"{epath.Path(workdir) / run_files.CHECKPOINT_DIR} (found steps {steps}).")
  step = steps[-1] if step is None else step
  return read_state(epath.Path(workdir) / run_files.CHECKPOINT_DIR / str(step) / "state"), step


def read_state(item) -> dict:
  """The orbax pytree saved at `item` (a step's `state` folder) as NumPy arrays, whatever
  topology and sharding wrote it."""
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(item).item_metadata.tree)
  return checkpointer.restore(item, restore_args=as_numpy)


@dataclasses.dataclass
class Run:
  """A trained run rebuilt from its workdir."""
  workdir: str
  config: ml_collections.ConfigDict
  model: Any
  variables: dict  # {'params': ..., **model_state}, NumPy arrays
  step: int
  num_classes: int

  @functools.cached_property
  def dataset(self):
    """The run's `data.Dataset` (its `info`, splits, streams), opened on first use: the data
    builders may need TFDS, and a run's weights alone need no data."""
    return data.open(self.config.data)


def load_run(workdir: str, step: int | None = None, *, num_classes: int | None = None) -> Run:
  """Rebuilds the model of the run in `workdir` and loads its checkpoint (default: newest).

  Args:
    workdir: a training run's workdir (holds `config.json` and `checkpoints/`).
    step: the checkpoint step; None for the newest.
    num_classes: the number of classes; by default read from the saved head's shape, so no
      dataset is touched.
  """
  config = load_config(workdir)
  tree, step = load_state_tree(workdir, step)
  params = tree["params"]
  if num_classes is None:
    num_classes = _num_classes_from_params(params)
  model = models.create(config.model_name, num_classes, **config.model.to_dict())
  variables = {"params": params, **(tree.get("model_state") or {})}
  return Run(workdir=workdir, config=config, model=model, variables=variables, step=step,
             num_classes=num_classes)


def _num_classes_from_params(params: dict) -> int:
  head = params.get("head")
  if not isinstance(head, dict) or "bias" not in head:
    raise ValueError("Cannot read the number of classes from the checkpoint (no head/bias "
                     "parameter); pass num_classes= explicitly.")
  return int(np.shape(head["bias"])[-1])


# Fields a resumed run may change: they alter neither the model, nor the data stream, nor
# the optimizer's trajectory up to the restored step (a `prefix.` entry covers its subtree).
HARMLESS_CHANGES = (
    "total_steps", "total_epochs", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "keep_checkpoints", "profile", "runlocal", "eval_batch_size",
    "init_from", "init_from.", "sharding.", "data.eval_splits", "data.data_dir",
    "data.manual_dir", "data.num_threads", "data.prefetch_batches", "data.num_workers")


class ConfigChangedError(errors.UserError):
  """A resumed run's config changes the model, the data stream or the optimizer."""


def _flat(tree, prefix="") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def config_changes(old, new) -> dict:
  """`{dotted field: (old, new)}` for every field that differs between two configs."""
  old, new = _flat(_to_json(old)), _flat(_to_json(new))
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}


def is_harmless(field: str) -> bool:
  return any(field == h or (h.endswith(".") and field.startswith(h))
             for h in HARMLESS_CHANGES)


def check_resume_config(config, workdir: str, *, accept: bool = False) -> dict:
  """Compares `config` with the one saved in `workdir` by the run it resumes.

  Harmless changes (`HARMLESS_CHANGES`: more steps, logging / eval / checkpoint frequency,
  eval splits, data paths and loader threads, sharding) are logged and accepted. Any other
  change (model fields, dataset and its options, batch size, seed, optimizer, schedule,
  regularizers, ...) would silently continue another experiment from these weights: it is
  refused unless `accept` (the `--accept_config_change` flag).

  Returns:
    The changes, `{field: (old, new)}` ({} when nothing changed or nothing was saved).
  Raises:
    ConfigChangedError: naming the differing fields and how to proceed.
  """
  if not epath.Path(run_files.config_path(workdir)).exists():
    return {}
  changes = config_changes(config_lib.with_defaults(load_config(workdir)), config)
  breaking = {k: v for k, v in changes.items() if not is_harmless(k)}
  if breaking and not accept:
    lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in breaking.items())
    raise ConfigChangedError(
        f"{workdir} holds a run with another config; resuming it with this one would change "
        f"the model, the data stream or the optimizer:\n{lines}\nRerun with the saved "
        f"config ({run_files.config_path(workdir)}), use a fresh --workdir, or pass "
        "--accept_config_change (train_and_evaluate(..., accept_config_change=True)) to "
        "resume anyway.")
  for k, (old, new) in changes.items():
    logging.warning("Resuming with a changed config: %s: %r -> %r%s", k, old, new,
                    "" if is_harmless(k) else " (accepted by --accept_config_change)")
  return changes
