"""Mixed precision contract: fp32 parameters and optimizer state, bf16 matmuls and attention,
fp32 loss and regularizer reductions (issue 10; docs/performance.md).

The checks read the traced program (jaxpr) of a training step, so they hold on any backend:
every matrix product and convolution of a model built with `dtype='bfloat16'` takes bf16
operands, and no model product runs in fp32 x fp32.
"""

import collections
import functools

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitreg_jax import models
from vitreg_jax import regularizers
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import steps

TINY = {
    'vit': ((2, 16, 16, 3), dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8)),
    'arvit': ((2, 32, 32, 3), dict(width=24, depth=2, num_heads=2, patch_size=16)),
    'resnet': ((2, 16, 16, 3), dict(depth=18, width=8)),
    'alternet': ((2, 16, 16, 3), dict(width=8, blocks_per_stage=(1, 2), msa_per_stage=(0, 1),
                                      heads=(1, 2), head_dim=8, msa_window=4)),
}
PRODUCTS = ('dot_general', 'conv_general_dilated')


def _sub_jaxprs(value):
  if isinstance(value, jex.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def product_dtypes(jaxpr) -> collections.Counter:
  """Counts (primitive, lhs dtype, rhs dtype) of every matmul/conv, nested jaxprs included."""
  counts = collections.Counter()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in PRODUCTS:
      counts[(eqn.primitive.name, str(eqn.invars[0].aval.dtype),
              str(eqn.invars[1].aval.dtype))] += 1
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        counts.update(product_dtypes(sub))
  return counts


def _state(name, dtype, concrete=False):
  """Model, optimizer, train state and batch; abstract (shapes only, no compute) by default."""
  shape, kwargs = TINY[name]
  model = models.create(name, 10, dtype=dtype, **kwargs)
  images = jnp.asarray(np.random.RandomState(0).normal(size=shape), jnp.float32)
  labels = jnp.arange(shape[0]) % 10
  tx = optax.adamw(1e-3)

  def init():
    variables = dict(model.init(jax.random.key(0), images))
    params = variables.pop('params')
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), model_state=variables,
                            rng=jax.random.key(1))

  state = jax.jit(init)() if concrete else jax.eval_shape(init)
  return model, tx, state, {'image': images, 'label': labels}


def _step(model, tx, regs=()):
  return functools.partial(steps.train_step, tx=tx, objective=objective_lib.Objective(
      model, num_classes=10, regularizers=list(regs)))


@pytest.mark.parametrize('name', sorted(TINY))
def test_bf16_model_computes_in_bf16_with_fp32_state(name):
  model, tx, state, batch = _state(name, 'bfloat16')
  step = _step(model, tx)
  counts = product_dtypes(jax.make_jaxpr(step)(state, batch).jaxpr)
  assert counts, 'no matrix products found in the traced step'
  # Every product has a bf16 operand; none runs fp32 x fp32. (JAX's XLA attention backward
  # multiplies fp32 score gradients by bf16 q/k, hence "a bf16 operand", not "both".)
  assert not [k for k in counts if k[1:] == ('float32', 'float32')], counts
  assert sum(n for k, n in counts.items() if k[1:] == ('bfloat16', 'bfloat16')) >= \
      0.8 * sum(counts.values()), counts
  # Shapes and dtypes of the step's outputs, without compiling it.
  new_state, measured = jax.eval_shape(step, state, batch)
  for tree in (new_state.params, new_state.opt_state, new_state.model_state):
    dtypes = {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes <= {'float32'}, dtypes
  for key in ('loss', 'ce', 'grad_norm'):
    assert measured[key].dtype == jnp.float32, key


def test_fp32_model_has_no_bf16():
  model, tx, state, batch = _state('vit', 'float32')
  counts = product_dtypes(jax.make_jaxpr(_step(model, tx))(state, batch).jaxpr)
  assert {k[1:] for k in counts} == {('float32', 'float32')}, counts


def test_regularizers_reduce_in_fp32_and_match_fp32_model():
  """Penalties of a bf16 model are fp32 scalars close to the fp32 model's (same params)."""
  regs = [dict(name='div', weight=1.0, layers=(1,)),
          dict(name='distance', weight=1.0, layers=(0,)),
          dict(name='similarity', weight=1.0, layers=(0,))]
  values = {}
  for dtype in ('float32', 'bfloat16'):
    model, _, state, batch = _state('vit', dtype, concrete=True)
    variables = {'params': jax.tree.map(lambda x: x + 0.05, state.params)}  # non-zero head
    def run(v, x, y, regs=regs, model=model):
      return regularizers.build(regs, model)(v, x, labels=y)
    logits, out, total, terms, _ = jax.eval_shape(run, variables, batch['image'],
                                                  batch['label'])
    assert logits.dtype == jnp.float32 and total.dtype == jnp.float32
    assert all(t.dtype == jnp.float32 for t in terms.values()), terms
    assert out['block0']['attn'].dtype == jnp.float32  # softmax of captured maps in fp32
    assert out['block0']['input'].dtype == jnp.dtype(dtype)  # the blocks compute in dtype
    # Values: the attention-map penalties (DIV's double backprop is slow to compile on CPU).
    _, _, _, terms, _ = jax.jit(functools.partial(run, regs=regs[1:]))(
        variables, batch['image'], batch['label'])
    values[dtype] = {k: float(v) for k, v in terms.items()}
  for key, ref in values['float32'].items():
    np.testing.assert_allclose(values['bfloat16'][key], ref, rtol=0.1, atol=1e-4,
                               err_msg=key)
