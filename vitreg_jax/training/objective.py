"""The training objective, built once per run: `Objective`.

    L(theta; batch) = loss(f_theta(mix(x)), smooth(mix(y)), batch, q) + sum_k weight_k * R_k

* `mix`: the batch's Mixup/CutMix recipe (`data.mixing.apply`; one-hot labels without one);
  `smooth`: `config.label_smoothing`. Their result is the *training targets*.
* `loss`: the registered loss `config.loss.name` names (`losses.py`: `'ce'`, ERM's mean
  cross-entropy; `'group_dro'`, vitreg_jax/baselines/group_dro.py; or one registered from
  outside the package). `q` is its state (None for CE, GroupDRO's group weights), carried in
  `TrainState.loss_state` and checkpointed.
* `R_k`: the regularizer terms of `config.regularizers` (`vitreg_jax.regularizers`), with the
  model's forward pass: the wrapper materializes attention maps only for the layers it needs.

One `Objective` serves the train step (`steps.train_step`), the balance check
(`loss_balance`: each weighted term's gradient against the loss's, GroupDRO's included) and
the analyses (`analysis/objective.py` reads `inputs` and `cross_entropy`). It owns what the
loop must know of the loss: its initial state (`init_state`) and the batch attributes it
reads (`batch_keys`). Its logged parts: `ce` (the mean training cross-entropy, whatever the
loss), `reg/<term>` (each unweighted term) and the loss's own figures.

Importing this module registers the built-in losses, so `resolve_loss` knows them all.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

from vitreg_jax import regularizers as regularizers_lib
from vitreg_jax.baselines import group_dro  # pylint: disable=unused-import  (registers it)
from vitreg_jax.data import mixing
from vitreg_jax.training import losses
from vitreg_jax.training import steps


def resolve_loss(loss_config) -> dict:
  """`config.loss` with its defaults, checked against every registered loss, the built-ins
  included (`losses.resolve`; `errors.UserError` for an unknown name, field or value)."""
  return losses.resolve(loss_config)


class Output(NamedTuple):
  """What one evaluation of the objective produced besides its value."""
  logits: Any
  data_loss: Any      # the registered loss's value (CE for ERM, GroupDRO's q-weighted loss)
  ce: Any             # the mean training cross-entropy (logged as `ce` whatever the loss)
  terms: dict         # each regularizer term, unweighted
  reg_total: Any      # sum_k weight_k * terms[k]
  measured: dict      # the loss's own figures (GroupDRO's group weights and losses)
  loss_state: Any     # the loss's state after this batch
  model_state: dict   # the model's updated mutable collections (BatchNorm statistics)


class Objective:
  """A run's training objective (module docstring).

  Attributes:
    model: the flax model.
    num_classes: the logits' classes (one-hot targets, Mixup/CutMix).
    loss: the built `losses.Loss` (default: cross-entropy).
    label_smoothing: `config.label_smoothing`.
    regularizer: the regularizer wrapper (`regularizers.build`), or None without terms.
    weights: `{term name: weight}` of the regularizer terms.
  """

  def __init__(self, model, *, num_classes: int, loss: losses.Loss | None = None,
               regularizers=(), label_smoothing: float = 0.0):
    self.model, self.num_classes = model, int(num_classes)
    self.loss = loss if loss is not None else losses.cross_entropy(None, None)
    self.label_smoothing = float(label_smoothing or 0.0)
    regs = [dict(r) for r in regularizers or ()]
    self.regularizer = regularizers_lib.build(regs, model) if regs else None
    self.weights = ({t.name: float(t.weight) for t in self.regularizer.terms_config}
                    if self.regularizer else {})

  @classmethod
  def from_config(cls, config, model, dataset, *, num_classes: int | None = None) -> "Objective":
    """The objective of `config` (`loss`, `regularizers`, `label_smoothing`) for `model`.

    `dataset`: the opened `data.Dataset` (`info.num_classes`; group counts for GroupDRO);
    `num_classes` overrides it (callers without a dataset pass `dataset=None`, for losses
    that need none).
    """
    return cls(model, num_classes=num_classes or dataset.info.num_classes,
               loss=losses.build(config, dataset), regularizers=config.get("regularizers"),
               label_smoothing=config.get("label_smoothing", 0.0))

  @property
  def init_state(self):
    """The loss's initial state (`TrainState.loss_state`): None for CE."""
    return self.loss.state

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """The batch attributes the loss reads besides image and label (GroupDRO's `group`)."""
    return self.loss.batch_keys

  def inputs(self, batch: dict):
    """`(images, targets)`: the batch mixed by its Mixup/CutMix recipe, if it carries one,
    and its `[B, K]` soft (unsmoothed) targets; the images must be the model's input."""
    return mixing.apply(batch, self.num_classes)

  def targets(self, targets):
    """The training targets: `targets` smoothed by `label_smoothing`."""
    if not self.label_smoothing:
      return targets
    return optax.smooth_labels(targets, self.label_smoothing)

  def cross_entropy(self, logits, targets):
    """The mean training cross-entropy of `logits` against (unsmoothed) soft `targets`."""
    return steps.soft_cross_entropy(logits, self.targets(targets))

  def forward(self, variables, images, *, labels, train, rngs, head_mask, mutable):
    """`(logits, out, reg_total, terms, new_model_state)`: the model, and with regularizers
    the wrapper, which returns the weighted penalty and each unweighted term."""
    if self.regularizer is not None:
      return self.regularizer(variables, images, labels=labels, train=train, rngs=rngs,
                              head_mask=head_mask, mutable=mutable)
    res = self.model.apply(variables, images, head_mask=head_mask, train=train, rngs=rngs,
                           mutable=mutable)
    (logits, out), new_state = res if mutable else (res, {})
    return logits, out, jnp.zeros((), jnp.float32), {}, dict(new_state)

  def __call__(self, variables, images, targets, batch, loss_state, *, rng, head_mask=None,
               mutable=False, train: bool = True) -> tuple[Any, Output]:
    """`(L, Output)` on one batch (differentiable in `variables['params']`).

    Args:
      variables: the model's variables (`params` and its other collections).
      images: the model's input (normalized, mixed: `inputs`).
      targets: the soft targets from `inputs` (smoothed here).
      batch: the device batch (its labels and the loss's `batch_keys`).
      loss_state: the loss's state (`TrainState.loss_state`).
      rng: the step's dropout key; head_mask, mutable, train: as for the model.
    """
    logits, _, reg_total, terms, new_model_state = self.forward(
        variables, images, labels=batch["label"], train=train, rngs={"dropout": rng},
        head_mask=head_mask, mutable=mutable)
    targets = self.targets(targets)
    data_loss, new_loss_state, measured = self.loss.fn(logits, targets, batch, loss_state)
    ce = steps.soft_cross_entropy(logits, targets)
    return data_loss + reg_total, Output(logits, data_loss, ce, terms, reg_total, measured,
                                         new_loss_state, dict(new_model_state))
