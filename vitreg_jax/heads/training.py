"""Per-eval head figures during training (`config.head_eval`): `WORKDIR/heads_eval.jsonl`.

Every evaluation appends each head's figures (the full model and each head alone of the
layers `config.head_eval` names, on every split but the training one), so the authors' choice
of epoch and head (`evaluate_epoch_head_combinations` in their code) needs no checkpoints
(`heads/summary.py` reads them back, `read_head_eval`, and computes the authors' statistics).
`HeadEvalHook` is the training loop's hook that runs it.
"""

from __future__ import annotations

import jax
import numpy as np

from vitreg_jax import errors
from vitreg_jax import roles as roles_lib
from vitreg_jax.heads import evaluate
from vitreg_jax.heads import examples as examples_lib
from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.training import hooks
from vitreg_jax.training import train_log
# The file's reader lives with the statistics that read it (light: the report imports it).
from vitreg_jax.heads.summary import HEAD_EVAL_FILE
from vitreg_jax.heads.summary import read_head_eval  # pylint: disable=unused-import


class TrainingHeadEval:
  """Appends every head's figures, at each evaluation, to `WORKDIR/heads_eval.jsonl`.

  One line per (step, split, mask): `{"step", "split", "kind": "full"|"alone", "layer",
  "head", "accuracy", "spurious_accuracy", "mean_confidence", ...}` for the full model and
  each head alone of the layers `config.head_eval` names, on every split but the training
  one; and, on the validation splits only, the same evaluation's per-example predictions and
  confidences in `WORKDIR/heads_examples/step_*.npz` (heads/examples.py), what the
  label-free rules read.
  """

  def __init__(self, config, model, dataset, workdir: str, start_step: int = 0):
    depth, num_heads = masks_lib.model_shape(model)
    self.layers = masks_lib.parse_layers(config.head_eval, depth)
    alone, self.index = masks_lib.head_masks(depth, num_heads, self.layers, "alone")
    self.masks = np.concatenate([np.ones((1, depth, num_heads), np.float32), alone])
    self.val_splits = validation_splits(dataset)
    self.run_eval = evaluate.RunEval(model, None, config, dataset, layers=self.layers,
                                     keep_examples=self.val_splits)
    # Lines and files past `start_step` (written after the checkpoint a resumed run restarts
    # from) go.
    self.out = train_log.JsonlWriter(workdir, start_step, name=HEAD_EVAL_FILE)
    self.examples = examples_lib.ExamplesWriter(workdir, start_step,
                                                enabled=jax.process_index() == 0)

  def __call__(self, step: int, state) -> None:
    """Evaluates the train state's (`params`, `model_state`) masks and appends the lines."""
    self.run_eval.variables = {"params": state.params, **state.model_state}
    results = self.run_eval(self.masks)
    keys = [("full", None, None)] + [("alone", l, h) for l, h in self.index]
    self.out.write_records([{"step": int(step), "split": split, "kind": kind, "layer": layer,
                             "head": head, **m}
                            for split, metrics in results.items()
                            for (kind, layer, head), m in zip(keys, metrics)])
    if self.val_splits:  # The same forward passes' per-example outputs (RunEval keeps them).
      self.examples.write(step, examples_lib.pack(keys, {
          s: self.run_eval.examples(self.masks, s) for s in self.val_splits}))


def validation_splits(dataset) -> tuple[str, ...]:
  """The roles' validation splits the dataset evaluates (`val_id`, `val_ood`; one split on
  Waterbirds' layout; none when the splits fit no layout)."""
  roles = roles_lib.split_roles(dataset.held_out_splits, dataset.info.attributes,
                                missing_ok=True)
  return tuple(s for s in dict.fromkeys((roles.val_id, roles.val_ood))
               if s in dataset.held_out_splits)


class HeadEvalHook(hooks.Hook):
  """The training loop's per-eval head evaluation (`TrainingHeadEval`), when
  `config.head_eval` names layers: '' / None (off), '-1' (last), 'all', '0,3'.

  `on_start` raises `errors.UserError`, before training, for a bad layer, a model without heads or
  several processes (the evaluation gathers nothing across hosts).
  """

  def on_start(self, run) -> None:
    self.head_eval = None
    if run.config.get("head_eval") in (None, "", False):
      return
    if jax.process_count() > 1:
      raise errors.UserError("config.head_eval runs in single-process training only: add "
                       "--config.head_eval='' and evaluate the checkpoints with "
                       "`python -m vitreg_jax.heads` instead.")
    self.head_eval = TrainingHeadEval(run.config, run.model, run.dataset, run.workdir,
                                      run.start_step)

  def on_eval(self, step: int, state) -> None:
    if self.head_eval:
      self.head_eval(step, state)
