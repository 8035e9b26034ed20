"""The train state and the jitted steps: `create_train_state`, `train_step`, `eval_step`.

`train_step` is one optimization step returning `(state, measurements)`; `eval_step` returns
per-example predictions and losses under a head mask that is an array argument, so evaluating
many masks compiles once. `jit_train_step` / `jit_eval_step` wrap them in `jax.jit` with the
state's shardings.

Loss: `objective.Objective` (vitreg_jax/training/objective.py), the registered loss of
`config.loss` plus the weighted regularizer terms of `config.regularizers`, built once per
run and passed to `train_step` whole.

Input: the pipeline's batches carry uint8 images; both steps normalize them first, on the
device, with `normalize` (`Dataset.normalization`, data/device_normalization.py), so
only uint8 crosses from the host. Float images (synthetic benchmark data, tests) are taken as
already normalized.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vitreg_jax import checks
from vitreg_jax import models
from vitreg_jax import sharding as shd


@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # Mutable collections other than params, e.g. {'batch_stats': ...}.
  rng: jax.Array
  # The loss's own state (objective.py): None for CE, GroupDRO's {'group_weights': [G]}.
  # Checkpointed with the rest; a None is not part of the pytree at all (`_flatten`), so CE
  # states have exactly the layout of checkpoints written before the field existed.
  loss_state: Any = None

  def replace(self, **changes) -> "TrainState":
    return dataclasses.replace(self, **changes)


_STATE_FIELDS = ("step", "params", "opt_state", "model_state", "rng", "loss_state")


def _flatten(state: TrainState):
  names = _STATE_FIELDS if state.loss_state is not None else _STATE_FIELDS[:-1]
  return [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names], len(names)


def _unflatten(num_fields: int, children) -> TrainState:
  return TrainState(**dict(zip(_STATE_FIELDS[:num_fields], children)))


jax.tree_util.register_pytree_with_keys(
    TrainState, _flatten, _unflatten,
    flatten_func=lambda s: (lambda kv, aux: ([v for _, v in kv], aux))(*_flatten(s)))


def create_model(config, num_classes: int) -> nn.Module:
  return models.create(config.model_name, num_classes, **dict(config.model))


def soft_cross_entropy(logits, targets, label_smoothing: float = 0.0, reduce: bool = True):
  """Softmax cross-entropy against soft `targets` `[B, K]` (rows summing to 1, e.g. one-hot
  labels or Mixup/CutMix mixtures), with optional label smoothing, in fp32: the mean, or the
  `[B]` per-example losses with `reduce=False`."""
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  return per_example.mean() if reduce else per_example


def model_images(images, normalize=None):
  """The model's float input: `normalize(images)`; without `normalize`, float images as given
  and a clear error for uint8 ones (they need the dataset's mean / std)."""
  if normalize is not None:
    return normalize(images)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"The batch holds {images.dtype} images (the input pipeline's uint8): pass "
                    "the step normalize=data.open(config.data).normalization to normalize them.")
  return images


def train_step(state: TrainState, batch: dict, *, objective, tx, head_mask=None,
               normalize=None):
  """One optimization step of `objective` (`objective.Objective`: the loss, its state in
  `state.loss_state`, the regularizer terms).

  `normalize` maps the batch's uint8 images to the model's input (see `model_images`); it runs
  before Mixup/CutMix, which mix normalized images (the map is affine and the mixture
  weights sum to 1, so mixing before or after normalizing is the same in exact arithmetic).

  Returns:
    `(new_state, measurements)`; measurements hold the total loss, the cross-entropy, every
    regularizer term (`reg/<name>`, unweighted), the loss's own figures, the gradient and
    parameter norms, the train accuracy and `finite`. A non-finite loss or gradient leaves
    the state unchanged (the host loop then stops with a clear error), so the in-memory state
    is always the last good one. (`optax.apply_if_finite` would skip the optimizer update
    only; the guard here also keeps the model state, e.g. BatchNorm statistics, and the loop
    stops rather than skipping.)
  """
  rng = jax.random.fold_in(state.rng, state.step)
  mutable = list(state.model_state) or False

  # Mixup/CutMix when the batch carries a recipe (config.data.mixup), else one-hot targets.
  batch = {**batch, "image": model_images(batch["image"], normalize)}
  images, targets = objective.inputs(batch)

  def loss_fn(params):
    return objective({"params": params, **state.model_state}, images, targets, batch,
                     state.loss_state, rng=rng, head_mask=head_mask, mutable=mutable)

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
      model_state=keep(out.model_state, state.model_state) if mutable
      else state.model_state,
      loss_state=keep(out.loss_state, state.loss_state))
  measurements = {
      "loss": loss, "ce": out.ce, "grad_norm": grad_norm,
      "param_norm": optax.global_norm(state.params),
      "accuracy": jnp.mean(jnp.argmax(out.logits, -1) == batch["label"]),
      "finite": finite,
      **{f"reg/{k}": v for k, v in out.terms.items()},
      **out.measured,
  }
  return new_state, measurements


def predictions(logits, labels) -> dict:
  """Per-example `pred` (argmax), `loss` (the unsmoothed cross-entropy, i.e. the negative
  log-likelihood of the label) and `confidence` (the predicted class's softmax probability,
  for the ECE): what `metrics.classification_metrics` reads, for any `[..., classes]` logits."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"pred": jnp.argmax(logits, -1), "loss": loss,
          "confidence": jnp.max(jax.nn.softmax(logits), -1)}


def eval_step(state: TrainState, batch: dict, head_mask, *, model, normalize=None):
  """Per-example `predictions` (masked examples are dropped later on the host)."""
  variables = {"params": state.params, **state.model_state}
  images = model_images(batch["image"], normalize)
  logits, _ = model.apply(variables, images, head_mask=head_mask, train=False)
  return predictions(logits, batch["label"])


def create_train_state(config, model, tx, image_shape, mesh,
                       loss_state=None) -> tuple[TrainState, Any]:
  """Initializes the (sharded) train state; returns it and its shardings.

  `loss_state`: the objective's initial state (`objective.Objective.init_state`; None for
  CE)."""
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)

  def init():
    variables = model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), model_state=variables, rng=state_rng,
                      loss_state=loss_state)

  abstract = jax.eval_shape(init)  # Fails fast (no compute) on bad shapes / fields.
  shardings = shd.state_shardings(abstract, mesh, config.sharding.get("fsdp", False),
                                  config.sharding.get("fsdp_min_size", 2**14))
  state = jax.jit(init, out_shardings=shardings)()
  return state, shardings


def all_heads_mask(model):
  """The all-ones `[depth, heads]` mask evaluations use (None for models without heads)."""
  shape = checks.head_shape(model)
  return None if shape is None else jnp.ones(shape, jnp.float32)


def jit_train_step(state_sharding, mesh, **step_kwargs):
  """`train_fn(state, batch) -> (state, measurements)`: `train_step` jitted on `mesh`.

  `step_kwargs` are `train_step`'s keyword arguments (objective, tx, head_mask, normalize);
  the old state is donated.
  """
  return jax.jit(functools.partial(train_step, **step_kwargs),
                 in_shardings=(state_sharding, shd.batch_sharding(mesh)),
                 out_shardings=(state_sharding, shd.replicated(mesh)), donate_argnums=0)


def jit_eval_step(state_sharding, mesh, *, model, normalize=None):
  """`eval_fn(state, batch, head_mask) -> {'pred', 'loss', 'confidence'}` per example, jitted
  on `mesh`."""
  return jax.jit(functools.partial(eval_step, model=model, normalize=normalize),
                 in_shardings=(state_sharding, shd.batch_sharding(mesh), shd.replicated(mesh)),
                 out_shardings=shd.batch_sharding(mesh))
