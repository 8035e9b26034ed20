"""Training objectives: `config.loss.name` = `'ce'` (default, ERM) or `'group_dro'`.

**GroupDRO** (Sagawa, Koh, Hashimoto & Liang 2020, "Distributionally Robust Neural Networks
for Group Shifts", ICLR; Algorithm 1 and Sec. 3.3). The objective is the worst expected loss
over the groups g (label x spurious attribute), `max_g E_{P_g}[l(theta; x, y)]`, optimized as a
game: group weights q on the simplex follow exponentiated-gradient ascent while theta descends
on the q-weighted loss. On a minibatch (the authors' code, kohpangwei/group_DRO, `loss.py`,
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
that constant does not change the gradient and is left out of our `loss`. q starts uniform, lives
in the train state (`TrainState.loss_state['group_weights']`) and is checkpointed, so a resumed
run continues the same game. The authors train GroupDRO with group-balanced sampling
(`--reweight_groups`): set `config.data.sampler='group_balanced'` too (configs/baselines.py does).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax.data import groups as groups_lib

LOSSES = ("ce", "group_dro")
DEFAULTS = {"name": "ce", "step_size": 0.01, "generalization_adjustment": 0.0,
            "normalize_loss": False}


def resolve(loss_config) -> dict:
  """`config.loss` with defaults; a clear error for an unknown name or field."""
  cfg = dict(loss_config.to_dict() if hasattr(loss_config, "to_dict") else loss_config or {})
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise errors.UserError(f"Unknown config.loss field(s) {unknown}; valid fields: {sorted(DEFAULTS)}.")
  cfg = {**DEFAULTS, **cfg}
  if cfg["name"] not in LOSSES:
    raise errors.UserError(f"Unknown config.loss.name {cfg['name']!r}; valid losses: {list(LOSSES)}.")
  if not float(cfg["step_size"]) >= 0:
    raise errors.UserError(f"config.loss.step_size (GroupDRO's eta) must be >= 0, got "
                     f"{cfg['step_size']!r}.")
  return cfg


def is_group_dro(loss_config) -> bool:
  return resolve(loss_config)["name"] == "group_dro"


def train_group_counts(config, info) -> np.ndarray:
  """Training examples per group (n_g), for GroupDRO; fails clearly without groups."""
  if groups_lib.num_groups(info) is None:
    raise errors.UserError(f"config.loss.name='group_dro' needs groups; dataset {info.name!r} has "
                     f"attributes {list(info.attributes)} (it needs `group`, or `spurious` "
                     "from which group = label x spurious is derived).")
  counts = groups_lib.group_counts(config.data)
  if (counts == 0).any():
    raise errors.UserError(f"GroupDRO: group(s) {np.flatnonzero(counts == 0).tolist()} have no "
                     f"training example (counts {counts.tolist()}).")
  return counts


def init_state(loss_config, num_groups: int | None) -> Any:
  """The loss's part of the train state: None for CE, the uniform q for GroupDRO."""
  if not is_group_dro(loss_config):
    return None
  return {"group_weights": jnp.full((num_groups,), 1.0 / num_groups, jnp.float32)}


def adjustment(loss_config, group_counts) -> np.ndarray:
  """`C / sqrt(n_g)` per group, or zeros unless every C is > 0 (the authors' rule)."""
  counts = np.asarray(group_counts, np.float64)
  c = np.broadcast_to(np.asarray(resolve(loss_config)["generalization_adjustment"],
                                 np.float64), counts.shape)
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


def objective(config, info) -> tuple[dict | None, Any, tuple]:
  """`(group_dro, loss_state, batch_keys)` for the train step: GroupDRO's
  `dict(step_size, adjust, normalize_loss)` and its initial q, or `(None, None, ())` for CE;
  `batch_keys` are the batch attributes the step needs on the device (`group`)."""
  cfg = resolve(config.loss)
  if cfg["name"] != "group_dro":
    return None, None, ()
  counts = train_group_counts(config, info)
  group_dro = dict(step_size=float(cfg["step_size"]),
                   adjust=jnp.asarray(adjustment(cfg, counts)),
                   normalize_loss=bool(cfg["normalize_loss"]))
  return group_dro, init_state(cfg, len(counts)), ("group",)
