"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

The pieces are top-level functions so tests, analyses and forks can reuse them:
`create_train_state` builds the sharded state, `train_step` is one jitted SGD step returning
`(state, measurements)`, `eval_step` returns per-example predictions under an optional head
mask (an array argument, so evaluating many masks compiles once). The loop adds data,
checkpoints (orbax, resume, SIGTERM), metric writers (clu: TensorBoard + logs, plus a
`metrics.jsonl` a report can read back) and progress reporting.

Loss: `L = CE(logits, y) + sum_k weight_k * R_k` where the regularizer terms `R_k` come from
`vitreg_jax.regularizers.build(config.regularizers, model)`.
"""

import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import flax
import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vitreg_jax import checkpoint as ckpt_lib
from vitreg_jax import config_lib
from vitreg_jax import optim
from vitreg_jax import rundir
from vitreg_jax import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # Mutable collections other than params, e.g. {'batch_stats': ...}.
  rng: jax.Array


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss or gradient."""


def create_model(config, num_classes: int) -> nn.Module:
  from vitreg_jax import models  # pylint: disable=g-import-not-at-top
  return models.create(config.model_name, num_classes, **dict(config.model))


def _head_mask_shape(model) -> tuple[int, int] | None:
  depth, heads = getattr(model, "depth", None), getattr(model, "num_heads", None)
  if isinstance(depth, int) and isinstance(heads, int):
    return depth, heads
  return None


def make_forward(model, regularizer_configs):
  """Returns `forward(variables, images, labels, train, rngs, head_mask, mutable)`.

  Without regularizers this is the plain `model.apply`; with them it is the regularizer
  wrapper, which materializes attention maps only for the layers it needs and returns the
  weighted penalty and each unweighted term.
  """
  if not regularizer_configs:
    def forward(variables, images, *, labels, train, rngs, head_mask, mutable):
      del labels
      res = model.apply(variables, images, head_mask=head_mask, train=train, rngs=rngs,
                        mutable=mutable)
      (logits, out), new_state = res if mutable else (res, {})
      return logits, out, jnp.zeros((), jnp.float32), {}, dict(new_state)
    return forward
  from vitreg_jax import regularizers  # pylint: disable=g-import-not-at-top
  reg = regularizers.build([dict(r) for r in regularizer_configs], model)

  def forward(variables, images, *, labels, train, rngs, head_mask, mutable):
    return reg(variables, images, labels=labels, train=train, rngs=rngs,
               head_mask=head_mask, mutable=mutable)
  return forward


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy with optional label smoothing (computed in fp32)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing) \
      if label_smoothing else jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def train_step(state: TrainState, batch: dict, *, forward, tx, num_classes: int,
               label_smoothing: float = 0.0, head_mask=None):
  """One optimization step.

  Returns:
    `(new_state, measurements)`; measurements hold the total loss, the cross-entropy, every
    regularizer term (`reg/<name>`, unweighted), the gradient and parameter norms, the train
    accuracy and `finite`. A non-finite loss or gradient leaves the state unchanged (the host
    loop then stops with a clear error), so the in-memory state is always the last good one.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  mutable = list(state.model_state) or False

  def loss_fn(params):
    variables = {"params": params, **state.model_state}
    logits, _, reg_total, terms, new_model_state = forward(
        variables, batch["image"], labels=batch["label"], train=True,
        rngs={"dropout": rng}, head_mask=head_mask, mutable=mutable)
    ce = cross_entropy(logits, batch["label"], num_classes, label_smoothing)
    return ce + reg_total, (ce, terms, new_model_state, logits)

  (loss, (ce, terms, new_model_state, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    # SAM (optim.py) evaluates the gradient again at its adversarial point; others ignore it.
    grad_fn = lambda params, _: jax.grad(lambda p: loss_fn(p)[0])(params)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
  else:
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      model_state=keep(dict(new_model_state), state.model_state) if mutable
      else state.model_state)
  measurements = {
      "loss": loss, "ce": ce, "grad_norm": grad_norm,
      "param_norm": optax.global_norm(state.params),
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      "finite": finite,
      **{f"reg/{k}": v for k, v in terms.items()},
  }
  return new_state, measurements


def eval_step(state: TrainState, batch: dict, head_mask, *, model, num_classes: int):
  """Per-example predictions and losses (masked examples are dropped later on the host)."""
  variables = {"params": state.params, **state.model_state}
  logits, _ = model.apply(variables, batch["image"], head_mask=head_mask, train=False)
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], num_classes))
  return {"pred": jnp.argmax(logits, -1), "loss": loss}


def classification_metrics(pred, loss, batch_arrays: dict) -> dict[str, float]:
  """Accuracy and loss over real examples, plus attribute-aware metrics.

  With a `spurious` attribute: `spurious_accuracy`, how often the prediction equals the
  spurious label (1.0 = the model follows the shortcut). With a `group` attribute:
  `group{g}_accuracy` and `worst_group_accuracy` (Sagawa et al. 2020).
  """
  mask = batch_arrays["mask"] > 0
  pred, loss, label = pred[mask], loss[mask], batch_arrays["label"][mask]
  metrics = {"accuracy": float(np.mean(pred == label)), "loss": float(np.mean(loss)),
             "num_examples": int(mask.sum())}
  if "spurious" in batch_arrays:
    metrics["spurious_accuracy"] = float(np.mean(pred == batch_arrays["spurious"][mask]))
  if "group" in batch_arrays:
    groups = batch_arrays["group"][mask]
    accs = {int(g): float(np.mean(pred[groups == g] == label[groups == g]))
            for g in np.unique(groups)}
    metrics.update({f"group{g}_accuracy": a for g, a in accs.items()})
    metrics["worst_group_accuracy"] = min(accs.values())
  return metrics


def evaluate(state, split: str, config, *, mesh, jitted_eval, head_mask=None):
  """Evaluates `state` on one split; every example counted exactly once."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  preds, losses, arrays = [], [], {}
  it = data.make_eval_iterator(config.data, split,
                               global_batch_size=config.eval_batch_size or config.batch_size)
  for batch in it:
    gbatch = shd.to_global({"image": batch["image"], "label": batch["label"]}, mesh)
    res = jitted_eval(state, gbatch, head_mask)
    res = multihost_utils.process_allgather(res, tiled=True)
    preds.append(np.asarray(res["pred"]))
    losses.append(np.asarray(res["loss"]))
    host = multihost_utils.process_allgather(
        {k: np.asarray(v) for k, v in batch.items() if k != "image"}, tiled=True)
    for k, v in host.items():
      arrays.setdefault(k, []).append(np.asarray(v))
  if not preds:
    raise ValueError(f"Eval split {split!r} of dataset {config.data.name!r} is empty.")
  arrays = {k: np.concatenate(v) for k, v in arrays.items()}
  return classification_metrics(np.concatenate(preds), np.concatenate(losses), arrays)


def create_train_state(config, model, tx, image_shape, mesh) -> tuple[TrainState, Any]:
  """Initializes the (sharded) train state; returns it and its shardings."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)

  def init():
    variables = model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), model_state=variables, rng=state_rng)

  abstract = jax.eval_shape(init)  # Fails fast (no compute) on bad shapes / fields.
  shardings = shd.state_shardings(abstract, mesh, config.sharding.get("fsdp", False),
                                  config.sharding.get("fsdp_min_size", 2**14))
  state = jax.jit(init, out_shardings=shardings)()
  return state, shardings


def _checkpoint_params(path: str, step: int | None) -> dict:
  """Params of another run (its workdir or its `checkpoints/` folder) as flat NumPy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vitreg_jax.models import convert  # pylint: disable=g-import-not-at-top
  directory = os.path.join(path, "checkpoints") if os.path.isdir(
      os.path.join(path, "checkpoints")) else path
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) \
      if os.path.isdir(directory) else []
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f"config.init_from: no checkpoint {step or ''} under {directory} "
                            f"(found steps {steps}).")
  item = os.path.join(directory, str(step if step is not None else steps[-1]), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(item).item_metadata.tree)
  return convert.flatten(checkpointer.restore(item, restore_args=as_numpy)["params"])


# config.init_from.kind of public ViT weights -> the layout `convert.load_vit` insists on.
PUBLIC_WEIGHT_KINDS = {"npz": None, "big_vision": "big_vision", "timm": "timm"}


def init_params_from(init_from, params, *, model, image_hw) -> Any:
  """Initializes `params` from a pretrained model (`config.init_from`), e.g. fine-tuning.

  `init_from = dict(path=..., kind='checkpoint' | 'npz' | 'big_vision' | 'timm', step=None,
  reset_head=None)`: `checkpoint` reads another vitreg_jax run (e.g. the ARViT rotation
  pretraining); the others read public ViT weights into a `vit` model (`models/convert.py`):
  `npz` detects the layout from the keys, `big_vision` (AugReg and big_vision `.npz`) and
  `timm` (a timm state_dict, `.safetensors` or `.npz`) insist on theirs. Every parameter is
  taken from the source; the head is
  re-initialized when its shape differs (new classes, or ARViT's flattened head at a new
  resolution) or when `reset_head=True`; a ViT's position embedding is resampled to the new
  patch grid. Anything else that does not fit is an error naming the parameters.
  """
  from vitreg_jax.models import convert  # pylint: disable=g-import-not-at-top
  cfg = dict(init_from)
  unknown = sorted(set(cfg) - {"path", "kind", "step", "reset_head"})
  if unknown or "path" not in cfg:
    raise ValueError(f"config.init_from needs `path` and accepts kind, step, reset_head; got "
                     f"unknown {unknown}.")
  kind, reset_head = cfg.get("kind", "checkpoint"), cfg.get("reset_head")
  if kind in PUBLIC_WEIGHT_KINDS:
    if not os.path.isfile(cfg["path"]):
      raise FileNotFoundError(f"config.init_from.path {cfg['path']!r} is not a file (kind "
                              f"{kind!r} reads a .npz or .safetensors file).")
    loaded = convert.load_vit(cfg["path"], params, model=model, image_hw=image_hw,
                              reset_head=reset_head, layout=PUBLIC_WEIGHT_KINDS[kind])
    logging.info("Initialized %d parameter arrays from %s (kind=%r).",
                 len(jax.tree.leaves(loaded)), cfg["path"], kind)
    return loaded
  if kind != "checkpoint":
    raise ValueError(f"config.init_from.kind must be one of "
                     f"{['checkpoint', *PUBLIC_WEIGHT_KINDS]}, got {kind!r}.")
  source, target = _checkpoint_params(cfg["path"], cfg.get("step")), convert.flatten(params)
  merged, problems = {}, []
  for key, fresh in target.items():
    have = source.get(key)
    if key.startswith("head/") and (reset_head or have is None or have.shape != fresh.shape):
      merged[key] = np.asarray(fresh)
    elif have is None:
      problems.append(f"{key}: missing in the source")
    elif (have.shape != fresh.shape and key == convert.POSEMB_KEY
          and have.shape[-1] == fresh.shape[-1]):  # Same width, another patch grid.
      gh, gw, prefix = model.token_layout(image_hw)
      merged[key] = convert.resample_posemb(have, (gh, gw), prefix)
    elif have.shape != fresh.shape:
      problems.append(f"{key}: source {have.shape} vs model {fresh.shape}")
    else:
      merged[key] = have
  if problems:
    raise ValueError(f"config.init_from {cfg['path']} does not fit the model:\n  "
                     + "\n  ".join(problems[:20])
                     + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
  logging.info("Initialized %d parameter arrays from %s.", len(merged), cfg["path"])
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})


class _JsonlWriter:
  """Appends `{"step", "split", **metrics}` lines to workdir/metrics.jsonl (process 0)."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = jax.process_index() == 0

  def write(self, step: int, split: str, metrics: dict):
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": int(step), "split": split,
                            **{k: float(v) for k, v in metrics.items()}}) + "\n")


def _num_train_steps(config, info) -> tuple[int, int | None]:
  n = (info.num_examples or {}).get(config.data.get("train_split", "train"))
  steps_per_epoch = math.ceil(n / config.batch_size) if n else None
  if config.total_steps is not None:
    return int(config.total_steps), steps_per_epoch
  if steps_per_epoch is None:
    raise ValueError("config.total_epochs needs the train split's size, which dataset "
                     f"{config.data.name!r} does not report; set config.total_steps instead.")
  return int(round(config.total_epochs * steps_per_epoch)), steps_per_epoch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates and checkpoints; resumes from the newest checkpoint in `workdir`.

  Returns:
    The final evaluation metrics, `{split: {metric: value}}`.
  """
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top

  # Everything that can be wrong with the config fails here, before any compute.
  config = config_lib.with_defaults(config)
  info = data.get_info(config.data)
  model = create_model(config, info.num_classes)
  total_steps, steps_per_epoch = _num_train_steps(config, info)
  tx, schedule = optim.make_optimizer(config, total_steps, steps_per_epoch)
  forward = make_forward(model, config.regularizers)
  mesh = shd.make_mesh()
  shd.check_batch_divisible(config.batch_size, mesh)
  shd.check_batch_divisible(config.eval_batch_size or config.batch_size, mesh)
  mask_shape = _head_mask_shape(model)
  train_mask = None
  if config.head_mask is not None:
    train_mask = jnp.asarray(config.head_mask, jnp.float32)
    if mask_shape is None or train_mask.shape != mask_shape:
      raise ValueError(f"config.head_mask has shape {train_mask.shape}; model "
                       f"{config.model_name!r} expects [depth, heads] = {mask_shape}.")

  os.makedirs(workdir, exist_ok=True)
  rundir.save_config(config, workdir)  # The run is self-describing (heads, analyses, report).
  state, state_sharding = create_train_state(config, model, tx, info.image_shape, mesh)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints,
                                       save_every=config.checkpoint_every_steps)
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    logging.info("Resumed from step %d (data position %s).", int(state.step), meta)
  elif config.init_from:
    params = init_params_from(config.init_from, jax.device_get(state.params), model=model,
                              image_hw=info.image_shape[:2])
    params = jax.device_put(params, state_sharding.params)
    state = state.replace(params=params, opt_state=jax.jit(
        tx.init, out_shardings=state_sharding.opt_state)(params))
  start_step = int(state.step)

  repl, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
  jitted_train = jax.jit(
      functools.partial(train_step, forward=forward, tx=tx, num_classes=info.num_classes,
                        label_smoothing=config.label_smoothing, head_mask=train_mask),
      in_shardings=(state_sharding, bsh), out_shardings=(state_sharding, repl),
      donate_argnums=0)
  jitted_eval = jax.jit(
      functools.partial(eval_step, model=model, num_classes=info.num_classes),
      in_shardings=(state_sharding, bsh, repl), out_shardings=bsh)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  jsonl = _JsonlWriter(workdir)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)]
  if config.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))

  eval_mask = None if mask_shape is None else jnp.ones(mask_shape, jnp.float32)

  def run_eval(step):
    results = {}
    for split in data.eval_splits(config.data, info):
      results[split] = evaluate(state, split, config, mesh=mesh,
                                jitted_eval=jitted_eval, head_mask=eval_mask)
      writer.write_scalars(step, {f"{split}/{k}": v for k, v in results[split].items()})
      jsonl.write(step, split, results[split])
    return results

  train_iter = data.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                        seed=config.seed, start_step=start_step)
  preemption = ckpt_lib.PreemptionFlag().install()
  pending, train_log, results = None, [], {}
  step = start_step

  def meta():
    return {"data_step": step, "model_name": config.model_name,
            "model": json.dumps(config.model.to_dict(), sort_keys=True, default=str)}

  def check(measured, at_step):
    if not bool(measured["finite"]):
      checkpointer.wait()
      last = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"Non-finite loss or gradient at step {at_step} (loss={float(measured['loss'])}, "
          f"grad_norm={float(measured['grad_norm'])}). Training stopped; the last good "
          f"checkpoint (step {last}) is kept in {checkpointer.directory}. Lower "
          "config.optimizer.lr, add config.optimizer.grad_clip_norm, or check the data.")

  loop_start = time.time()
  try:
    while step < total_steps:
      batch = next(train_iter)
      gbatch = shd.to_global({"image": batch["image"], "label": batch["label"]}, mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, measured = jitted_train(state, gbatch)
      # Check the previous step while this one runs, so the host never stalls the device.
      if pending is not None:
        check(*pending)
        train_log.append(pending[0])
      pending = (measured, step + 1)
      step += 1
      for h in hooks:
        h(step)
      if step % config.log_every_steps == 0 or step == total_steps:
        check(*pending)
        logged = jax.device_get(train_log + [pending[0]])
        summary = {k: float(np.mean([m[k] for m in logged])) for k in logged[0]
                   if k != "finite"}
        summary["lr"] = float(schedule(step - 1))
        # Wall time of this session's loop (compilation and evals included); it restarts at 0
        # on resume, which the report accounts for when it sums time to a target accuracy.
        summary["elapsed_s"] = time.time() - loop_start
        writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
        jsonl.write(step, "train", summary)
        train_log, pending = [], None
      if step % config.eval_every_steps == 0 and step < total_steps:
        results = run_eval(step)
      if step % config.checkpoint_every_steps == 0:
        if pending is not None:
          check(*pending)  # Never save a state whose step was not finite.
        checkpointer.save(step, state, meta())
      if preemption.requested or checkpointer.reached_preemption(step):
        if pending is not None:
          check(*pending)
        checkpointer.save(step, state, meta(), force=True)
        checkpointer.wait()
        logging.warning("Preempted: saved step %d; rerun the same command to resume.", step)
        writer.flush()
        return {}
    if pending is not None:
      check(*pending)
    checkpointer.save(step, state, meta(), force=True)
    results = run_eval(step)
    writer.flush()
  finally:
    preemption.uninstall()
    checkpointer.close()
  if jax.process_index() == 0:
    for split, metrics in results.items():
      line = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in metrics.items())
      print(f"[final] step {step} {split}: {line}", flush=True)
      logging.info("[final] step %d %s: %s", step, split, line)
  return results
