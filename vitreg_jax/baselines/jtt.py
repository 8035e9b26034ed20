r"""JTT, "Just Train Twice" (Liu et al. 2021, ICML, Sec. 3, Algorithm 1): the error set.

Stage 1 trains ERM for T steps (the identification model); its error set is the training
examples it misclassifies, `E = {i : f_id(x_i) != y_i}`. Stage 2 trains a fresh model on the
training set with E upsampled: each example of E appears `lambda_up + 1` times per epoch by
default, as the authors' code builds it (anniesch/jtt, `run_expt.py`, `main`: the training set
concatenated with `lambda_up` more copies of E), or `lambda_up` times with
`data.upsample['copies']='lambda'` (vitreg_jax/data/groups.py). Here stage 2 is the same
config with `data.sampler='upsample'` and `data.upsample=dict(file=<stage 1>/jtt_error_set.json,
factor=lambda_up)` (configs/baselines.py, `method=jtt`); the trainer writes the error set when
it is missing, or run

  python -m vitreg_jax.jtt --workdir=STAGE1 [--step=N]

How E is computed here, and how that differs from the authors: here E is the mistakes of one
checkpoint (stage 1's last, or `--step`) evaluated after training, in evaluation mode
(dropout off), over the train split once with evaluation preprocessing (no augmentation).
The authors' E (`train.py`, `run_epoch`, whose training pass writes
`output_train_epoch_{T}.csv`, read by `process_training.py`) is the *online* predictions of
epoch T's training pass: each batch predicted in training mode (dropout on, BatchNorm batch
statistics, training augmentation when `--augment_data`) just before that batch's update, so
its examples are judged by models that differ along the epoch. The two sets agree when
the model barely changes within an epoch and training-mode noise is small; they are not the
same set. No group labels are used; the file records the groups of E only as a diagnostic
(how much of E is minority groups). `ErrorSetHook` is the training loop's part
(`ensure_error_set` before anything reads the data).
"""

from __future__ import annotations

import json
import os

from etils import epath
import numpy as np

from vitreg_jax import errors
from vitreg_jax.training import features
from vitreg_jax.training import hooks
from vitreg_jax.training import rundir

ERROR_SET_FILE = "jtt_error_set.json"


def error_set(workdir: str, step: int | None = None) -> dict:
  """The identification run's misclassified training examples (the JSON `write` saves)."""
  run = rundir.load_run(workdir, step)
  split = run.dataset.train_split
  out = features.extract(run, split)
  wrong = np.flatnonzero(out["pred"] != out["label"])
  record = {"workdir": os.path.abspath(workdir), "step": run.step, "train_split": split,
            "num_examples": int(len(out["label"])), "num_errors": int(len(wrong)),
            "train_accuracy": float(np.mean(out["pred"] == out["label"])),
            "indices": wrong.tolist()}
  if "group" in out:
    g = out["group"]
    n = int(g.max()) + 1
    record["errors_per_group"] = np.bincount(g[wrong], minlength=n).tolist()
    record["examples_per_group"] = np.bincount(g, minlength=n).tolist()
  return record


def write(workdir: str, step: int | None = None, path: str | None = None) -> str:
  """Computes the error set of `workdir` (checkpoint `step`, default the newest) and writes it
  to `path` (default `workdir/jtt_error_set.json`, `..._step<N>.json` for a given step)."""
  record = error_set(workdir, step)
  name = ERROR_SET_FILE.replace(".json", f"_step{step}.json") if step else ERROR_SET_FILE
  path = path or os.path.join(workdir, name)
  rundir.write_text(path, json.dumps(record, indent=1))
  return path


def ensure_error_set(config) -> None:
  """Before training: with `data.sampler='upsample'`, writes the identification run's error
  set where `data.upsample.file` expects it if it is missing (and that folder is a run), and
  checks it indexes the same train split (and, with `data.upsample.step`, that checkpoint)."""
  if config.data.get("sampler") != "upsample" or not config.data.get("upsample"):
    return
  upsample = dict(config.data.upsample)
  path = epath.Path(upsample["file"])
  if not path.exists() and (path.parent / "config.json").exists():
    write(str(path.parent), upsample.get("step"), str(path))
  if path.exists():
    saved = json.loads(path.read_text())
    want = config.data.get("train_split", "train")
    if saved.get("train_split", want) != want:
      raise errors.UserError(f"{path} indexes train split {saved['train_split']!r}, but this run "
                             f"trains on {want!r}: the error set must come from the same split.")
    if upsample.get("step") and saved.get("step") != upsample["step"]:
      raise errors.UserError(f"{path} holds the errors of step {saved.get('step')}, not "
                             f"of data.upsample.step={upsample['step']}.")


class ErrorSetHook(hooks.Hook):
  """The training loop's JTT step: `ensure_error_set` before the data is opened (its
  upsampling sampler reads the error set)."""

  def prepare(self, config) -> None:
    ensure_error_set(config)
