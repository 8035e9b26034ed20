"""GroupDRO, the training loss `config.loss.name='group_dro'` (registered here).

Sagawa, Koh, Hashimoto & Liang 2020, "Distributionally Robust Neural Networks for Group
Shifts", ICLR; Algorithm 1 and Sec. 3.3. The objective is the worst expected loss over the
groups g (label x spurious attribute), `max_g E_{P_g}[l(theta; x, y)]`, optimized as a game:
group weights q on the simplex follow exponentiated-gradient ascent while theta descends on
the q-weighted loss. On a minibatch (the authors' code, kohpangwei/group_DRO, `loss.py`,
`LossComputer.compute_group_avg` and `compute_robust_loss`, which is Algorithm 1 with every
group of the batch updated at once):

    L_g      = mean loss of the batch's examples of group g          (0 if none)
    A_g      = L_g + C / sqrt(n_g)     generalization adjustment, n_g = training examples of g
    q_g     <- q_g * exp(eta * A_g);   q <- q / sum(q)               (before theta's step)
    loss     = sum_g q_g L_g           (q held constant in the gradient)

`eta` is `config.loss.step_size` (their `--robust_step_size`, 0.01), `C` is
`config.loss.generalization_adjustment` (their `--generalization_adjustment`; a number or one
per group; applied only when every group's C is > 0, as their code does), and
`normalize_loss=True` divides A by its sum before the update (their `--normalize_loss`). Their
code adds the adjustment to `L_g` in place, so the loss it *logs* includes `sum_g q_g C/sqrt(n_g)`;
that constant does not change the gradient and is left out of our `loss`. The per-example loss
is the training cross-entropy (label smoothing and Mixup/CutMix targets included). q starts
uniform, lives in the train state (`TrainState.loss_state['group_weights']`) and is
checkpointed, so a resumed run continues the same game. The authors train GroupDRO with
group-balanced sampling (`--reweight_groups`): set `config.data.sampler='group_balanced'` too
(configs/baselines.py does). Logged: `group_dro/weight{g}` (q after the step) and
`group_dro/loss{g}` (L_g).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax.data import groups as groups_lib
from vitreg_jax.training import losses
from vitreg_jax.training import steps

OPTIONS = {"step_size": 0.01, "generalization_adjustment": 0.0, "normalize_loss": False}


def check(loss_config: dict) -> None:
  """Refuses a negative (or NaN) eta before any compute."""
  if not float(loss_config["step_size"]) >= 0:
    raise errors.UserError(f"config.loss.step_size (GroupDRO's eta) must be >= 0, got "
                           f"{loss_config['step_size']!r}.")


def _group_counts(dataset) -> np.ndarray:
  """Training examples per group (n_g, `Dataset.train_group_counts`); fails clearly
  without groups or with an empty group."""
  info = dataset.info
  counts = dataset.train_group_counts
  if counts is None:
    raise errors.UserError(
        f"config.loss.name='group_dro' needs groups; dataset {info.name!r} has attributes "
        f"{list(info.attributes)} (it needs `group`, or `spurious` from which group = label x "
        "spurious is derived).")
  counts = np.asarray(counts, np.float64)
  if (counts == 0).any():
    raise errors.UserError(f"GroupDRO: group(s) {np.flatnonzero(counts == 0).tolist()} have no "
                           f"training example (counts {counts.tolist()}).")
  return counts


def adjustment(generalization_adjustment, group_counts) -> np.ndarray:
  """`C / sqrt(n_g)` per group, or zeros unless every C is > 0 (the authors' rule)."""
  counts = np.asarray(group_counts, np.float64)
  c = np.broadcast_to(np.asarray(generalization_adjustment, np.float64), counts.shape)
  return (c / np.sqrt(counts) if (c > 0).all() else np.zeros_like(counts)).astype(np.float32)


def group_mean(per_example, groups, num_groups: int):
  """`(L_g, count_g)`: the mean of `per_example` over each group (0 where a group is absent)."""
  onehot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)  # [B, G]
  count = onehot.sum(0)
  return (onehot.T @ per_example.astype(jnp.float32)) / jnp.maximum(count, 1.0), count


def group_dro(per_example, groups, weights, *, step_size: float, adjust,
              normalize_loss: bool = False):
  """One GroupDRO step on a batch (module docstring).

  Args:
    per_example: `[B]` losses (differentiable).
    groups: `[B]` int group ids in `[0, G)`.
    weights: `[G]` current q.
    step_size: eta.
    adjust: `[G]` `C / sqrt(n_g)` (`adjustment`).
    normalize_loss: divide the adjusted losses by their sum before the update.
  Returns:
    `(loss, new_weights, group_losses)`; the gradient flows through `loss` only, with q fixed.
  """
  group_loss, _ = group_mean(per_example, groups, weights.shape[0])
  adjusted = jax.lax.stop_gradient(group_loss) + adjust
  if normalize_loss:
    adjusted = adjusted / adjusted.sum()
  new_weights = weights * jnp.exp(step_size * adjusted)
  new_weights = new_weights / new_weights.sum()
  return group_loss @ new_weights, new_weights, group_loss


def init_state(num_groups: int) -> dict:
  """The uniform q, GroupDRO's part of the train state."""
  return {"group_weights": jnp.full((num_groups,), 1.0 / num_groups, jnp.float32)}


def make_loss(num_groups: int, *, step_size: float, adjust,
              normalize_loss: bool = False) -> losses.Loss:
  """GroupDRO over `batch['group']` as a `losses.Loss`, q starting uniform (`group_dro`'s
  arguments); `build` makes it from the config and the training split's group counts."""
  step = dict(step_size=float(step_size), adjust=jnp.asarray(adjust, jnp.float32),
              normalize_loss=bool(normalize_loss))

  def fn(logits, targets, batch, state):
    per_example = steps.soft_cross_entropy(logits, targets, reduce=False)
    loss, weights, group_loss = group_dro(per_example, batch["group"],
                                          state["group_weights"], **step)
    measured = {**{f"group_dro/weight{g}": weights[g] for g in range(num_groups)},
                **{f"group_dro/loss{g}": group_loss[g] for g in range(num_groups)}}
    return loss, {"group_weights": weights}, measured
  return losses.Loss(fn, state=init_state(num_groups), batch_keys=("group",))


@losses.register("group_dro", options=OPTIONS, check=check)
def build(config, dataset) -> losses.Loss:
  """GroupDRO for the run's training split (module docstring)."""
  cfg = losses.resolve(config.loss)
  counts = _group_counts(dataset)
  return make_loss(len(counts), step_size=cfg["step_size"],
                   adjust=adjustment(cfg["generalization_adjustment"], counts),
                   normalize_loss=cfg["normalize_loss"])
