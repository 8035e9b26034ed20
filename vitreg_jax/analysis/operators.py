r"""Curvature operators of an `objective.Objective`: `v -> H v` and `v -> G v`, per batch or
over a dataset.

* Hessian (`hessian`): forward-over-reverse, `Hv = jvp(grad L, (w,), (v,))`.
* Generalized Gauss-Newton (`ggn`, Schraudolph 2002; Martens 2020, Sec. 6):
  `G = J^T H_out J + H_L2`, J the Jacobian of the logits in the parameters, H_out the
  Hessian of the cross-entropy in the logits (`(diag(p) - p p^T) / B` per example, PSD; label
  smoothing and soft targets do not change it), H_L2 the Hessian of the objective's L2 term
  (`objective.l2_term`: PSD in each form; `wd` times the 0/1 diagonal of the decayed
  parameters for `squared`). G is positive semi-definite and drops the second-order term
  `sum dCE/dz * d^2 z/dw^2` of H. One product: a linearization (forward + JVP) of the logits,
  one JVP in the logits, one transpose (VJP).
* Over a dataset (`over_dataset`): the operator of the mean loss over N examples in batches
  of equal size B is the mean of the per-batch operators (each batch's loss is already a mean,
  and the L2 term is in each, so the mean keeps it once). The products are accumulated by a
  `lax.scan` over the stacked batches `[num_batches, B, ...]` inside one compiled function.
* A 0/1 `mask` on the flat vector gives the operator `P H P` of a parameter block: its
  non-zero spectrum is that of the exact diagonal block `H_bb` (`--per_block` uses this to
  compile once for every block; `--params` restricts the vector itself, `Objective.restrict`).
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vitreg_jax import errors

OPERATORS = ("hessian", "ggn")


def hvp(loss: Callable, theta, batch, v):
  """Hessian-vector product `H(theta) v` by forward-over-reverse differentiation."""
  return jax.jvp(lambda t: jax.grad(loss)(t, batch), (theta,), (v,))[1]


def ggn_vp(obj, theta, batch, v):
  """Gauss-Newton-vector product `(J^T H_out J + Hess(L2)) v` (see the module docstring)."""
  images, targets = obj.inputs(batch)
  logits, jvp_fn = jax.linearize(lambda t: obj.logits(t, images), theta)
  jv = jvp_fn(v)
  out_hv = jax.jvp(jax.grad(lambda z: obj.data_loss(z, targets)), (logits,), (jv,))[1]
  (gv,) = jax.linear_transpose(jvp_fn, theta)(out_hv)
  return gv + hvp(lambda t, _: obj.penalty(t), theta, None, v)


def batch_operator(obj, operator: str = "hessian") -> Callable:
  """`matvec(theta, batch, v)` of one batch's Hessian or Gauss-Newton matrix."""
  if operator not in OPERATORS:
    raise errors.UserError(f"operator must be one of {OPERATORS}, got {operator!r}.")
  if operator == "hessian":
    return functools.partial(hvp, obj.loss)
  return functools.partial(ggn_vp, obj)


def over_dataset(matvec: Callable) -> Callable:
  """`matvec(theta, stacked, v)`: the mean of `matvec` over stacked batches (leading axis)."""
  def dataset_matvec(theta, stacked, v):
    def body(acc, batch):
      return acc + matvec(theta, batch, v), None
    total, _ = jax.lax.scan(body, jnp.zeros_like(v), stacked)
    return total / jax.tree.leaves(stacked)[0].shape[0]
  return dataset_matvec


def masked(matvec: Callable, mask: Optional[jax.Array]) -> Callable:
  """`v -> P matvec(P v)` for the 0/1 diagonal projection `mask` (identity when None)."""
  if mask is None:
    return matvec
  return lambda v: mask * matvec(mask * v)


def dense(matvec: Callable, n: int, dtype=jnp.float32):
  """The full `[n, n]` matrix, one column per product (tests and tiny models only)."""
  return jax.lax.map(matvec, jnp.eye(n, dtype=dtype))
