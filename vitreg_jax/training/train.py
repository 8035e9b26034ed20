"""The training loop: `train_and_evaluate(config, workdir)`.

This module is the loop only; its pieces live in modules named for their job:
`steps` (the train state, the jitted train and eval steps), `evaluation` (metrics over the
eval splits), `pretrained` (`config.init_from`), `checkpoint` (orbax saves, resume,
preemption), `train_log` (TensorBoard, metrics.jsonl, the non-finite check), `rundir`
(the saved config.json) and `heads` (the training head mask, the per-eval head figures).
"""

import math
import os

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
from vitreg_jax.training import inflight
from vitreg_jax.training import loss_balance
from vitreg_jax.training import losses
from vitreg_jax.training import optim
from vitreg_jax.training import pretrained
from vitreg_jax.training import run_files
from vitreg_jax.training import rundir
from vitreg_jax.training import steps
from vitreg_jax.training import train_log


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       accept_config_change: bool = False) -> dict:
  """Trains, evaluates and checkpoints; resumes from the newest checkpoint in `workdir`.

  A resume whose config changes the model, the data stream or the optimizer is refused
  unless `accept_config_change` (`rundir.check_resume_config`).

  Returns:
    The final evaluation metrics, `{split: {metric: value}}` (`{}` when preempted).
  """
  # Everything that can be wrong with the config fails here, before any compute.
  config = config_lib.with_defaults(config)
  jtt.ensure_error_set(config)  # JTT's stage 2 reads the identification run's errors.
  info = data.get_info(config.data)
  model = steps.create_model(config, info.num_classes)
  forward = steps.make_forward(model, config.regularizers)
  train_mask = head_masks.train_head_mask(config, model)  # config.head_mask
  group_dro, loss_state, batch_keys = losses.objective(config, info)  # config.loss
  total_steps, steps_per_epoch = num_train_steps(config, info)
  tx, schedule = optim.make_optimizer(config, total_steps, steps_per_epoch)
  mesh = make_mesh(config)
  if run_files.checkpoint_steps(workdir):  # A resume: is it still the same experiment?
    rundir.check_resume_config(config, workdir, accept=accept_config_change)

  rundir.save_config(config, workdir)  # The run is self-describing (heads, analyses, report).
  state, shardings = steps.create_train_state(config, model, tx, info.image_shape, mesh,
                                              loss_state=loss_state)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints,
                                       save_every=config.checkpoint_every_steps)
  state = restore_or_initialize(state, shardings, checkpointer, config, tx=tx, model=model,
                                image_hw=info.image_shape[:2])
  start_step = int(state.step)
  normalize = data.normalization(config.data)  # Batches arrive as uint8; steps normalize.
  train_fn = steps.jit_train_step(shardings, mesh, forward=forward, tx=tx,
                                  num_classes=info.num_classes, head_mask=train_mask,
                                  label_smoothing=config.label_smoothing, normalize=normalize,
                                  group_dro=group_dro)
  # Each weighted regularizer term against cross-entropy, logged and checked (loss_balance).
  balance_fn = loss_balance.make_balance_fn(model, config, num_classes=info.num_classes,
                                            normalize=normalize, head_mask=train_mask)
  balance_check = loss_balance.BalanceCheck(balance_fn.checked) if balance_fn else None
  eval_fn = steps.jit_eval_step(shardings, mesh, model=model, num_classes=info.num_classes,
                                normalize=normalize)
  eval_mask = steps.all_heads_mask(model) if train_mask is None else train_mask
  head_eval = head_training.training_hook(config, model, info, workdir,  # config.head_eval
                                           start_step)

  def evaluate_all(s):
    results = evaluation.evaluate_splits(s, config, info, mesh=mesh, eval_fn=eval_fn,
                                         head_mask=eval_mask)
    if head_eval:
      head_eval(int(s.step), s)
    return results
  report = train_log.Reporter(workdir, config, total_steps=total_steps, start_step=start_step,
                              schedule=schedule, checkpointer=checkpointer)
  train_iter = device_batches(
      data.make_train_iterator(config.data, global_batch_size=config.batch_size,
                               seed=config.seed, start_step=start_step), mesh,
      extra_keys=batch_keys)

  with ckpt_lib.Preemption(checkpointer) as preemption, checkpointer:
    for step in range(start_step + 1, total_steps + 1):  # `step` counts steps done.
      batch = next(train_iter)
      if balance_check and balance_check.pending and step == start_step + 1:
        balance_check(step - 1, jax.device_get(balance_fn(state, batch)))  # the first batch
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, measured = train_fn(state, batch)
      extra = None
      if balance_fn and report.is_log_step(step):
        extra = jax.device_get(balance_fn(state, batch))
        if balance_check.pending:  # until every DIV term has had its verdict
          balance_check(step, extra)
      report.train(step, measured, extra)
      if step % config.eval_every_steps == 0 and step < total_steps:
        report.eval(step, evaluate_all(state))
      preempted = preemption.reached(step)  # The same step on every process.
      if step % config.checkpoint_every_steps == 0 or step == total_steps or preempted:
        report.check_finite()  # Never save a state whose step was not finite.
        checkpointer.save(step, state, ckpt_lib.run_meta(config, step), force=True)
      if preempted:
        checkpointer.wait()
        logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
        report.final(step, {})
        return {}
    results = evaluate_all(state)
    report.eval(total_steps, results)
  report.final(total_steps, results)
  return results


def num_train_steps(config, info) -> tuple[int, int | None]:
  """`(total_steps, steps_per_epoch)` from `total_steps` or `total_epochs`."""
  n = (info.num_examples or {}).get(config.data.get("train_split", "train"))
  steps_per_epoch = math.ceil(n / config.batch_size) if n else None
  if config.total_steps is not None:
    return int(config.total_steps), steps_per_epoch
  if steps_per_epoch is None:
    raise errors.UserError("config.total_epochs needs the train split's size, which dataset "
                     f"{config.data.name!r} does not report; set config.total_steps instead.")
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
  Mixup/CutMix recipe, which the train step applies; `extra_keys` (GroupDRO's `group`)."""
  return inflight.prefetch_to_device(host_batches, mesh, size=size,
                                     keys=(*inflight.TRAIN_KEYS, *extra_keys))
