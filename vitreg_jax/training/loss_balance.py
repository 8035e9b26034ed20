"""How hard each weighted regularizer term pushes the parameters, against the data loss.

A regularizer can silently do nothing: the poster's raw-gradient DIV (`dict(name='div',
weight=100)`, the paper's definition and the regularizer's default) is ~1e-9 on a small ViT,
so at the authors' lambda it trains plain ERM; and a term that moves with the 4th power of
the input gradients (`div=paper`) changes strength by orders of magnitude as training goes.
So every `log_every_steps` (and before the first update) the trainer measures, on the batch
it is about to train on, with the training objective itself (`objective.Objective`: the
batch mixed and smoothed as the train step does, the run's registered loss with its state,
the regularizer wrapper):

* `balance/ce_grad_norm`: ||d loss / d theta|| of the data loss: the cross-entropy for ERM,
  GroupDRO's q-weighted group loss for GroupDRO (the key keeps its name);
* per term `k`: `balance/<k>` = weight_k x term_k (what the loss adds) and
  `balance/<k>_grad_norm` = ||d (weight_k x term_k) / d theta||, and their ratio to
  the data loss's, `balance/<k>_grad_ratio`,
written to metrics.jsonl (split `train`) and TensorBoard beside `train/ce`.

Refusal: a DIV term whose gradient ratio is below `NEGLIGIBLE` (1e-3) the first time it is
non-zero stops training (other terms are logged only) with `NegligibleTermError`, one message naming the fix. Measured on
the quickstart ViT (batch 64): a bare `dict(name='div', weight=100)` pushes 5e-5 (at
initialization) to 8e-5 (after 600 ERM steps) as hard as cross-entropy, the authors'
normalized form at the same weight 7.7 to 13.6 times as hard; under Adam's per-parameter
scaling a term a thousandth of the gradient does not steer training.

A term that is exactly zero cannot be judged by its ratio, and a DIV term can stay exactly
zero: it sums products of *pairs* of heads' input gradients, so a regularized block with
fewer than two unmasked heads (a one-head model, or `config.head_mask` keeping one head of
that block) gives 0 at every step. Two refusals, both `errors.UserError` in one line:

* before any compute (`check_heads`, from the config alone: the model's `num_heads` and
  `config.head_mask`, in `BalanceHook.prepare`): a checked term on a block with fewer than 2
  unmasked heads;
* at run time (`BalanceCheck`): a checked term still exactly zero at `ZERO_LIMIT` = 3
  measurements in a row, i.e. the one before the first update and the first two log steps.
  Why three: the one known legitimate zero is a zero-initialized classifier head (the
  quickstart's), whose top logit does not depend on the input until the first update moves
  it; with a linear warmup the first update has learning rate 0 (`optax.linear_schedule`
  from 0), so at `log_every_steps=1` log step 1 can still see 0, and log step 2 cannot.
  Until then a zero term is measured again at the next log step.

A term with weight 0 (a deliberate ERM run, e.g. `div_weight=0`) is neither checked nor refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax import checks
from vitreg_jax import errors
from vitreg_jax import regularizers
from vitreg_jax.heads import masks as head_masks
from vitreg_jax.regularizers import registry
from vitreg_jax.training import hooks
from vitreg_jax.training import steps

NEGLIGIBLE = 1e-3
ZERO_LIMIT = 3  # exactly-zero measurements in a row before a checked term is refused


class NegligibleTermError(errors.UserError):
  """A weighted regularizer term too small to change training."""


def make_balance_fn(objective, *, normalize=None, head_mask=None):
  """A jitted `balance(state, batch) -> {name: value}` (module docstring) of `objective`
  (`objective.Objective`), or None without regularizers."""
  reg = objective.regularizer
  if reg is None:
    return None
  weights = objective.weights

  @jax.jit
  def balance(state, batch):
    batch = {**batch, "image": steps.model_images(batch["image"], normalize)}
    images, targets = objective.inputs(batch)
    rng = jax.random.fold_in(state.rng, state.step)   # the train step's own dropout key
    mutable = list(state.model_state) or False

    def parts(params):
      _, out = objective({"params": params, **state.model_state}, images, targets, batch,
                         state.loss_state, rng=rng, head_mask=head_mask, mutable=mutable)
      return {"ce": out.data_loss, **{k: weights[k] * v for k, v in out.terms.items()}}

    values, vjp = jax.vjp(parts, state.params)
    one_hot = lambda name: {k: jnp.float32(k == name) for k in values}
    norms = {k: optax.global_norm(vjp(one_hot(k))[0]) for k in values}
    out = {"ce_grad_norm": norms["ce"]}
    for k in weights:
      out[k] = values[k]
      out[f"{k}_grad_norm"] = norms[k]
      out[f"{k}_grad_ratio"] = norms[k] / jnp.maximum(norms["ce"], 1e-30)
    return out
  balance.weights = weights
  # Refused when negligible: the terms whose spec says so (DIV, the known silent no-op).
  # Other terms (ARViT's maps penalties) are logged only: a paper's small weight there is the
  # paper's choice.
  balance.checked = {t.name: CheckedWeight(t.weight, t.spec.negligible_fix)
                     for t in _checked_terms(reg)}
  return balance


def _checked_terms(reg) -> list:
  """The terms refused when negligible (their spec says so: DIV), weight 0 left out (a
  deliberately switched-off term trains plain ERM, as the report labels it)."""
  return [t for t in reg.terms_config if t.spec.refuse_if_negligible and t.weight != 0]


def check_heads(regularizer, model, head_mask=None) -> None:
  """Refuses, before any step, a checked term over per-head input gradients (DIV) on a block
  with fewer than 2 unmasked heads: its pairwise sum is then exactly 0 at every step.

  Args:
    regularizer: the run's `regularizers.Regularizer` (None: nothing to check).
    model: the model (its `depth` / `num_heads`; a model without heads is not checked).
    head_mask: the training head mask `[depth, heads]` (`config.head_mask`), None = all.
  Raises:
    errors.UserError: one line naming the term, the block, its unmasked heads and the fix.
  """
  shape = checks.head_shape(model)
  if regularizer is None or shape is None:
    return
  mask = np.ones(shape) if head_mask is None else np.asarray(head_mask)
  for term in _checked_terms(regularizer):
    if registry.HEAD_INPUT_GRADS not in term.spec.needs:
      continue
    for layer in term.layers:
      kept = int(np.count_nonzero(mask[layer]))
      if kept < 2:
        raise errors.UserError(
            f"Regularizer term {term.name!r} (weight {term.weight:g}) on block {layer} would "
            f"be exactly 0 at every step: it compares pairs of heads, and that block has "
            f"{kept} unmasked head(s) of {shape[1]} (model num_heads, config.head_mask). "
            "Fix: regularize a block with at least 2 unmasked heads (layers=...), keep more "
            "heads in config.head_mask, or drop the term.")


class CheckedWeight(float):
  """A checked term's weight that also carries its regularizer's fix for the refusal message
  (`RegularizerSpec.negligible_fix`); a plain float weight carries none."""

  def __new__(cls, weight: float, fix: str = ""):
    self = super().__new__(cls, weight)
    self.fix = fix
    return self


class BalanceCheck:
  """Refuses negligible terms and terms that stay exactly zero; remembers which terms are
  judged (module docstring). Call it with each measurement, in order."""

  def __init__(self, weights: dict):
    self.weights = dict(weights)
    self.pending = set(weights)
    self.zero_steps = {name: [] for name in weights}

  def __call__(self, step: int, measured: dict) -> None:
    for name in sorted(self.pending):
      ratio = float(measured[f"{name}_grad_ratio"])
      if ratio == 0.0:  # e.g. a zero-initialized head: judge it at the next measurement...
        self.zero_steps[name].append(step)
        if len(self.zero_steps[name]) >= ZERO_LIMIT:  # ... but not forever.
          raise ZeroTermError(_zero_message(name, self.weights[name], self.zero_steps[name]))
        continue
      self.pending.discard(name)
      if ratio < NEGLIGIBLE:
        raise NegligibleTermError(_message(name, self.weights[name], ratio, step))


class ZeroTermError(NegligibleTermError):
  """A weighted regularizer term that stayed exactly zero (module docstring)."""


def _zero_message(name: str, weight: float, zero_steps: list) -> str:
  return (f"Regularizer term {name!r} (weight {weight:g}) is exactly 0 at steps "
          f"{', '.join(map(str, zero_steps))} ({ZERO_LIMIT} measurements in a row), so "
          "training is plain ERM. Its per-head input gradients vanish: check that the "
          "regularized block has at least 2 heads that reach the prediction (config.head_mask, "
          "the term's layers, a frozen or zeroed classifier head).")


def _message(name: str, weight: float, ratio: float, step: int) -> str:
  factor = NEGLIGIBLE / ratio
  fix = getattr(weight, "fix", "")
  return (f"Regularizer term {name!r} (weight {weight:g}) is negligible: at step {step} the "
          f"gradient of weight x term is {ratio:.1e} of cross-entropy's (< {NEGLIGIBLE:g}), so "
          f"training would be plain ERM. Fix: {fix}raise its weight at least {factor:.0e}-fold "
          f"(weight >= {weight * factor:.2g}).")


class BalanceHook(hooks.Hook):
  """The training loop's balance log and check (module docstring): `check_heads` before the
  data is opened; measured on the first batch before the first update (checked, not logged)
  and at every log step (logged as `train/balance/*`, checked until every DIV term has had
  its verdict)."""

  def prepare(self, config) -> None:
    if not config.get("regularizers"):
      return
    # The model as a description only (nothing initialized); its depth and heads do not
    # depend on the number of classes, which needs the data.
    model = steps.create_model(config, num_classes=2)
    check_heads(regularizers.build(config.regularizers, model), model,
                head_masks.train_head_mask(config, model))

  def on_start(self, run) -> None:
    self.balance = make_balance_fn(run.objective, normalize=run.normalize,
                                   head_mask=run.train_mask)
    self.check = BalanceCheck(self.balance.checked) if self.balance else None
    self.first_step = run.start_step + 1

  def before_step(self, step, state, batch) -> None:
    if self.check and self.check.pending and step == self.first_step:
      self.check(step - 1, jax.device_get(self.balance(state, batch)))

  def after_step(self, step, state, batch, logged: bool) -> dict | None:
    if not (self.balance and logged):
      return None
    measured = jax.device_get(self.balance(state, batch))
    if self.check.pending:
      self.check(step, measured)
    return {f"balance/{k}": v for k, v in measured.items()}
