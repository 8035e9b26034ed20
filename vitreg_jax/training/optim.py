"""Optimizers and learning-rate schedules built from a config with optax.

`config.optimizer` names the optimizer and its hyper-parameters; `config.schedule` the
learning-rate schedule (a multiplier on `config.optimizer.lr`). Everything is plain optax:
this module only translates config fields, validates them and documents the choices.

Weight decay: `adamw` uses decoupled weight decay (Loshchilov & Hutter); for `sgd` and `adam`
a non-zero `weight_decay` adds the classic coupled L2 term `wd * w` to the gradient before the
optimizer, as torch.optim does. By default only parameters with ndim >= 2 (kernels, patch and
position embeddings) are decayed, not biases or LayerNorm scales, as timm does;
`decay_1d_params=True` decays every parameter.

SAM (Foret et al. 2021, "Sharpness-Aware Minimization"; the optimizer comparison of "How do
ViTs work?"): `name='sam'` wraps the optimizer named by `base` (default `sgd` with momentum)
in `optax.contrib.sam` in opaque mode: each step first moves to the adversarial point
`w + rho * g / ||g||`, takes the gradient there (the same loss, regularizers included, on the
same batch) and gives it to the base optimizer at `w`. The train step passes the gradient
function as `tx.update(..., grad_fn=...)` (every optimizer here accepts it; only SAM uses it),
so one SAM step costs two forward-backward passes. BatchNorm statistics come from the clean
pass only (opaque mode keeps the adversarial pass invisible).
"""

from typing import Any, Mapping

import jax
import optax

from vitreg_jax import errors

OPTIMIZERS = ("sgd", "adam", "adamw", "sam")
SAM_BASES = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step", "linear")

_OPTIMIZER_FIELDS = {
    "name", "lr", "weight_decay", "momentum", "nesterov", "b1", "b2", "eps",
    "grad_clip_norm", "decay_1d_params", "base", "rho",
}
_SCHEDULE_FIELDS = {
    "name", "warmup_steps", "warmup_epochs", "boundaries", "boundary_epochs",
    "decay_factor", "end_factor",
}


def _check_fields(cfg: Mapping[str, Any], valid: set, what: str):
  unknown = sorted(set(cfg) - valid)
  if unknown:
    raise errors.UserError(
        f"Unknown {what} field(s) {unknown}. Valid fields: {sorted(valid)}.")


def make_schedule(schedule_cfg: Mapping[str, Any], base_lr: float, total_steps: int,
                  steps_per_epoch: int | None = None) -> optax.Schedule:
  """Returns the learning-rate schedule `step -> lr`.

  Args:
    schedule_cfg: `name` in SCHEDULES; `warmup_steps` (or `warmup_epochs`) of linear warmup
      from 0; for `step`: `boundaries` (steps) or `boundary_epochs` (epochs, e.g. (70, 80) as in
      the head-diversity authors' MNIST-CIFAR recipe) at which the lr is multiplied by
      `decay_factor` (default 0.1); for `cosine`/`linear`: decay to `end_factor * base_lr`.
    base_lr: peak learning rate.
    total_steps: length of training, including warmup.
    steps_per_epoch: needed only for the `*_epochs` fields.
  """
  cfg = dict(schedule_cfg)
  _check_fields(cfg, _SCHEDULE_FIELDS, "schedule")
  name = cfg.get("name", "constant")
  if name not in SCHEDULES:
    raise errors.UserError(f"Unknown schedule {name!r}. Valid schedules: {list(SCHEDULES)}.")

  def epochs_to_steps(epochs):
    if steps_per_epoch is None:
      raise errors.UserError("Schedules given in epochs need the train split's size; use the "
                             "step-based fields (warmup_steps, boundaries) instead.")
    return int(round(epochs * steps_per_epoch))

  warmup = cfg.get("warmup_steps", 0)
  if cfg.get("warmup_epochs"):
    warmup = epochs_to_steps(cfg["warmup_epochs"])
  if warmup >= total_steps and total_steps > 0 and name != "constant":
    raise errors.UserError(
        f"warmup ({warmup} steps) must be shorter than training ({total_steps}).")
  decay_steps = max(total_steps - warmup, 1)
  end = base_lr * cfg.get("end_factor", 0.0)

  if name == "constant":
    main = optax.constant_schedule(base_lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=cfg.get("end_factor", 0.0))
  elif name == "linear":
    main = optax.linear_schedule(base_lr, end, decay_steps)
  else:  # step
    if cfg.get("boundary_epochs") is not None:
      bounds = [epochs_to_steps(e) for e in cfg["boundary_epochs"]]
    else:
      bounds = list(cfg.get("boundaries", ()))
    factor = cfg.get("decay_factor", 0.1)
    # Boundaries count from the start of training; the main schedule starts after warmup.
    main = optax.piecewise_constant_schedule(
        base_lr, {max(int(b) - warmup, 0): factor for b in bounds})
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup), main], [warmup])
  return main


def _decay_mask(params, decay_1d: bool):
  return jax.tree.map(lambda p: decay_1d or p.ndim >= 2, params)


def make_optimizer(config, total_steps: int, steps_per_epoch: int | None = None):
  """Builds `(tx, schedule)` from `config.optimizer` and `config.schedule`.

  Args:
    config: the experiment config; reads `optimizer` and `schedule`.
    total_steps: number of training steps (for the schedule).
    steps_per_epoch: optional, for epoch-based schedule fields.

  Returns:
    An optax GradientTransformation (gradient clipping, weight decay and the optimizer
    chained, with the scheduled lr) and the schedule itself (for logging).
  """
  opt = dict(config.optimizer)
  _check_fields(opt, _OPTIMIZER_FIELDS, "optimizer")
  name = opt.get("name", "adam")
  if name not in OPTIMIZERS:
    raise errors.UserError(f"Unknown optimizer {name!r}. Valid optimizers: {list(OPTIMIZERS)}.")
  lr = opt.get("lr", 1e-3)
  schedule = make_schedule(config.get("schedule", {}), lr, total_steps, steps_per_epoch)
  wd = opt.get("weight_decay", 0.0)
  mask = lambda p: _decay_mask(p, opt.get("decay_1d_params", False))

  if name != "sam" and ({"base", "rho"} & set(opt)):
    raise errors.UserError(f"optimizer.base and optimizer.rho are SAM fields; set "
                           f"optimizer.name='sam' to use them (got name={name!r}).")
  base = opt.get("base", "sgd") if name == "sam" else name
  if base not in SAM_BASES:
    raise errors.UserError(f"SAM's optimizer.base must be one of {list(SAM_BASES)}, got {base!r}.")
  tx = optax.chain(*_base_chain(base, opt, schedule, wd, mask))
  if name == "sam":
    rho = opt.get("rho", 0.05)
    if not rho > 0:
      raise errors.UserError(f"SAM needs optimizer.rho > 0 (the adversarial radius), got {rho}.")
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    tx = optax.chain(optax.contrib.sam(tx, adversary, sync_period=2, opaque_mode=True))
  return tx, schedule


def _base_chain(name, opt, schedule, wd, mask) -> list:
  """Gradient clipping, weight decay and the optimizer `name`, as a list for optax.chain."""
  chain = []
  if opt.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(opt["grad_clip_norm"]))
  if name == "adamw":
    chain.append(optax.adamw(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999),
                             eps=opt.get("eps", 1e-8), weight_decay=wd, mask=mask))
  else:
    if wd:
      chain.append(optax.add_decayed_weights(wd, mask=mask))
    if name == "adam":
      chain.append(optax.adam(schedule, b1=opt.get("b1", 0.9), b2=opt.get("b2", 0.999),
                              eps=opt.get("eps", 1e-8)))
    else:
      chain.append(optax.sgd(schedule, momentum=opt.get("momentum", 0.9) or None,
                             nesterov=opt.get("nesterov", False)))
  return chain
