"""Training losses by name: `config.loss.name` picks one from a small registry.

A loss is one `register(name, build, options=...)` call, from this package or from outside it:

* `options`: the `config.loss` fields it reads, with their defaults (`config.loss` holds `name`
  and every registered loss's options, each defaulted, so a saved config says what ran);
* `check(resolved config.loss)`: an optional validation, run by `resolve` before any compute;
* `build(config, dataset) -> Loss`, called once per run by `objective.Objective.from_config`
  (`dataset`: the opened `data.Dataset`, for losses that need group counts and the like).

The `Loss` it builds is a function of the model's logits, the training targets, the device
batch and the loss's own state (e.g. GroupDRO's group weights, carried in
`TrainState.loss_state` and checkpointed), plus the batch attributes it reads and the figures
it logs. Built in: `'ce'` (here: ERM's mean cross-entropy) and `'group_dro'`
(vitreg_jax/baselines/group_dro.py, registered when `objective.py` is imported).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from vitreg_jax import errors
from vitreg_jax import registry
from vitreg_jax.training import steps


@dataclasses.dataclass(frozen=True)
class Loss:
  """One run's loss, as the objective calls it at every step.

  Attributes:
    fn: `fn(logits, targets, batch, state) -> (loss, new_state, measured)`. `targets` are the
      `[B, K]` training targets (Mixup/CutMix mixtures of one-hot labels, label-smoothed), so
      `steps.soft_cross_entropy(logits, targets, reduce=False)` is the training
      cross-entropy per example; `batch` holds `image`, `label` and `batch_keys`; `measured`
      is `{name: scalar}` of the loss's own figures, logged as `train/<name>`. The gradient
      flows through `loss` only; `new_state` is the state after this batch.
    state: the initial state (a pytree; None for a stateless loss).
    batch_keys: the batch attributes it reads besides image and label (GroupDRO's `group`);
      the loop transfers them to the device.
  """
  fn: Callable
  state: Any = None
  batch_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Spec:
  """A registered loss: its name, `build(config, dataset) -> Loss`, options and check."""
  name: str
  build: Callable
  options: dict
  check: Callable | None = None


REGISTRY = registry.Registry("loss", origin=lambda spec: spec.build)


def register(name: str, build: Callable | None = None, *, options: dict | None = None,
             check: Callable | None = None, replace: bool = False):
  """Registers loss `name` (usable as a decorator on `build`); returns `build`.

  Args:
    name: the `config.loss.name` that selects it.
    build: `build(config, dataset) -> Loss` (module docstring).
    options: `{field: default}` of the `config.loss` fields it reads.
    check: `check(loss_config)` raising `errors.UserError` for a bad option value.
    replace: register over another definition of `name` (vitreg_jax/registry.py: the same
      definition again, e.g. a config file loaded twice, replaces it quietly).
  Raises:
    UserError: another loss has the name (and not `replace`), or an option is `name` or
      another loss's option with another default (each field of `config.loss` has one
      default).
  """
  if build is None:
    return lambda fn: register(name, fn, options=options, check=check, replace=replace)
  options = dict(options or {})
  for field, default in options.items():
    others = [s.name for s in REGISTRY.values()
              if s.name != name and field in s.options and s.options[field] != default]
    if field == "name" or others:
      raise errors.UserError(f"Loss {name!r}: option {field!r} clashes with `name` or with the "
                       f"option of the same name of {others}.")
  REGISTRY.register(name, Spec(name, build, options, check), replace=replace)
  return build


def names() -> list[str]:
  """The registered losses' names."""
  return sorted(REGISTRY)


def defaults() -> dict:
  """`config.loss`'s defaults: `name='ce'` and every registered loss's options."""
  merged = {"name": "ce"}
  for spec in REGISTRY.values():
    merged.update(spec.options)
  return merged


def resolve(loss_config) -> dict:
  """`config.loss` with defaults; `errors.UserError` for an unknown name, field or value."""
  cfg = dict(loss_config.to_dict() if hasattr(loss_config, "to_dict") else loss_config or {})
  valid = defaults()
  unknown = sorted(set(cfg) - set(valid))
  if unknown:
    raise errors.UserError(f"Unknown config.loss field(s) {unknown}; valid fields: "
                           f"{sorted(valid)}.")
  cfg = {**valid, **cfg}
  if cfg["name"] not in REGISTRY:
    raise errors.UserError(f"Unknown config.loss.name {cfg['name']!r}; valid losses: "
                           f"{names()}.")
  spec = REGISTRY[cfg["name"]]
  if spec.check is not None:
    spec.check(cfg)
  return cfg


def build(config, dataset) -> Loss:
  """The `Loss` that `config.loss.name` names, built for this run (`Spec.build`)."""
  return REGISTRY[resolve(config.loss)["name"]].build(config, dataset)


@register("ce")
def cross_entropy(config, dataset) -> Loss:
  """ERM: the batch's mean cross-entropy against the training targets; no state."""
  del config, dataset  # Label smoothing is in the targets (`objective.Objective.targets`).
  return Loss(lambda logits, targets, batch, state: (
      steps.soft_cross_entropy(logits, targets), state, {}))
