"""The training loop: `train_and_evaluate(config, workdir)`.

This module is the loop only; its pieces live in modules named for their job:
`objective` (the loss, its state, the regularizer terms), `steps` (the train state, the
jitted train and eval steps), `evaluation` (metrics over the eval splits), `pretrained`
(`config.init_from`), `checkpoint` (orbax saves, resume, preemption), `train_log`
(TensorBoard, metrics.jsonl, the non-finite check), `rundir` (the saved config.json) and
`heads.masks` (the training head mask). Extra behaviour is a list of hooks (`hooks.py`;
`default_hooks`: JTT's error set, the regularizer balance check, the per-head evaluation).
"""

import math
import os
from typing import Sequence

from absl import logging
import jax
import ml_collections

from vitreg_jax import config_lib
from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax import sharding as shd
from vitreg_jax.baselines import jtt
from vitreg_jax.heads import masks as head_masks
from vitreg_jax.heads import training as head_training
from vitreg_jax.training import checkpoint as ckpt_lib
from vitreg_jax.training import evaluation
from vitreg_jax.training import hooks as hooks_lib
from vitreg_jax.training import inflight
from vitreg_jax.training import loss_balance
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import optim
from vitreg_jax.training import pretrained
from vitreg_jax.training import run_files
from vitreg_jax.training import rundir
from vitreg_jax.training import steps
from vitreg_jax.training import train_log


def default_hooks() -> list[hooks_lib.Hook]:
  """The built-in hooks, each a no-op unless its config asks for it: JTT's error set
  (`data.sampler='upsample'`), the regularizer balance log and check
  (`config.regularizers`), the per-head evaluation (`config.head_eval`)."""
  return [jtt.ErrorSetHook(), loss_balance.BalanceHook(), head_training.HeadEvalHook()]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       accept_config_change: bool = False,
                       hooks: Sequence[hooks_lib.Hook] = ()) -> dict:
  """Trains, evaluates and checkpoints; resumes from the newest checkpoint in `workdir`.

  A resume whose config changes the model, the data stream or the optimizer is refused
  unless `accept_config_change` (`rundir.check_resume_config`). `hooks` run after
  `default_hooks()` at the loop's points (hooks.py).

  Returns:
    The final evaluation metrics, `{split: {metric: value}}` (`{}` when preempted).
  """
  # Everything that can be wrong with the config fails here, before any compute.
  config = config_lib.with_defaults(config)
  hooks = hooks_lib.Hooks([*default_hooks(), *hooks])
  hooks.prepare(config)
  dataset = data.open(config.data)  # Missing files, unknown splits or options fail here.
  info = dataset.info
  model = steps.create_model(config, info.num_classes)
  objective = objective_lib.Objective.from_config(config, model, dataset)  # loss, regularizers
  train_mask = head_masks.train_head_mask(config, model)  # config.head_mask
  total_steps, steps_per_epoch = num_train_steps(config, dataset)
  tx, schedule = optim.make_optimizer(config, total_steps, steps_per_epoch)
  mesh = make_mesh(config)
  if run_files.checkpoint_steps(workdir):  # A resume: is it still the same experiment?
    rundir.check_resume_config(config, workdir, accept=accept_config_change)

  rundir.save_config(config, workdir)  # The run is self-describing (heads, analyses, report).
  state, shardings = steps.create_train_state(config, model, tx, info.image_shape, mesh,
                                              loss_state=objective.init_state)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints,
                                       save_every=config.checkpoint_every_steps)
  state = restore_or_initialize(state, shardings, checkpointer, config, tx=tx, model=model,
                                image_hw=info.image_shape[:2])
  start_step = int(state.step)
  normalize = dataset.normalization  # Batches arrive as uint8; steps normalize.
  hooks.on_start(hooks_lib.Run(
      config=config, workdir=workdir, dataset=dataset, model=model, objective=objective, mesh=mesh,
      train_mask=train_mask, normalize=normalize, start_step=start_step,
      total_steps=total_steps))
  train_fn = steps.jit_train_step(shardings, mesh, objective=objective, tx=tx,
                                  head_mask=train_mask, normalize=normalize)
  eval_fn = steps.jit_eval_step(shardings, mesh, model=model, normalize=normalize)
  eval_mask = steps.all_heads_mask(model) if train_mask is None else train_mask

  def evaluate(s):
    results = evaluation.evaluate_splits(s, config, dataset, mesh=mesh, eval_fn=eval_fn,
                                         head_mask=eval_mask)
    hooks.on_eval(int(s.step), s)
    return results
  report = train_log.Reporter(workdir, config, total_steps=total_steps, start_step=start_step,
                              schedule=schedule, checkpointer=checkpointer)
  train_iter = device_batches(
      dataset.train_iterator(global_batch_size=config.batch_size, seed=config.seed,
                             start_step=start_step), mesh,
      extra_keys=objective.batch_keys)
  return _loop(config, state, train_iter, start_step=start_step, total_steps=total_steps,
               train_fn=train_fn, evaluate=evaluate, hooks=hooks, report=report,
               checkpointer=checkpointer)


def _loop(config, state, train_iter, *, start_step, total_steps, train_fn, evaluate, hooks,
          report, checkpointer) -> dict:
  """Steps `start_step + 1 .. total_steps`: train, hooks, logs, evals, checkpoints and
  preemption; returns the final evaluation (`{}` when preempted)."""
  with ckpt_lib.Preemption(checkpointer) as preemption, checkpointer:
    for step in range(start_step + 1, total_steps + 1):  # `step` counts steps done.
      batch = next(train_iter)
      hooks.before_step(step, state, batch)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, measured = train_fn(state, batch)
      report.train(step, measured,
                   hooks.after_step(step, state, batch, report.is_log_step(step)))
      if step % config.eval_every_steps == 0 and step < total_steps:
        report.eval(step, evaluate(state))
      preempted = preemption.reached(step)  # The same step on every process.
      if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted:
        report.check_finite()  # Never save a state whose step was not finite.
        checkpointer.save(step, state, ckpt_lib.run_meta(config, step), force=True)
      if preempted:
        checkpointer.wait()
        logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
        report.final(step, {})
        return {}
    results = evaluate(state)
    report.eval(total_steps, results)
  report.final(total_steps, results)
  return results


def num_train_steps(config, dataset) -> tuple[int, int | None]:
  """`(total_steps, steps_per_epoch)` from `total_steps` or `total_epochs` (the size of the
  opened `dataset`'s train split)."""
  n = (dataset.info.num_examples or {}).get(dataset.train_split)
  steps_per_epoch = math.ceil(n / config.batch_size) if n else None
  if config.total_steps is not None:
    return int(config.total_steps), steps_per_epoch
  if steps_per_epoch is None:
    raise errors.UserError("config.total_epochs needs the train split's size, which dataset "
                           f"{dataset.name!r} does not report; set config.total_steps "
                           "instead.")
  return int(round(config.total_epochs * steps_per_epoch)), steps_per_epoch


def make_mesh(config):
  """The mesh over all devices, after checking both batch sizes divide over it."""
  mesh = shd.make_mesh()
  shd.check_batch_divisible(config.batch_size, mesh)
  shd.check_batch_divisible(config.eval_batch_size or config.batch_size, mesh)
  return mesh


def restore_or_initialize(state, shardings, checkpointer, config, *, tx, model, image_hw):
  """The newest checkpoint's state if there is one, else `state` (from `init_from` if set)."""
  had_checkpoints = checkpointer.latest_step() is not None
  # Unreadable checkpoints are skipped (each logged with its reason); None: none was readable.
  restored = checkpointer.restore(state) if had_checkpoints else None
  if restored is not None:
    state, meta = restored
    logging.info("Resumed from step %d (data position %s).", int(state.step), meta)
    return state
  if had_checkpoints:
    logging.warning("No readable checkpoint in %s (the unreadable ones were moved to %s.skipped):"
                    " starting from step 0.", checkpointer.directory, checkpointer.directory)
  if config.init_from:
    state = pretrained.init_state_from(config.init_from, state, shardings, tx=tx, model=model,
                                       image_hw=image_hw)
  return state


def device_batches(host_batches, mesh, size: int = 2, extra_keys=()):
  """The global on-device training batches, the next `size` transferred while a step runs
  (vitreg_jax/training/inflight.py): uint8 images, labels and, with `data.mixup`, the batch's
  Mixup/CutMix recipe, which the train step applies; `extra_keys`: the attributes the loss
  reads (`Objective.batch_keys`, GroupDRO's `group`)."""
  return inflight.prefetch_to_device(host_batches, mesh, size=size,
                                     keys=(*inflight.TRAIN_KEYS, *extra_keys))
