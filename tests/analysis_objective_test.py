"""The analysed objective is the loss the run trained with (issue 18, item 7).

One batch with a Mixup/CutMix recipe drawn by the pipeline's own `mixing.draw`, label
smoothing 0.1 and weight decay 0.05: the objective equals the train step's cross-entropy plus
an L2 term: the authors' (every tensor's unsquared norm, summed: the default) or the squared
one, whose gradient is the optimizer's coupled weight decay."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vitreg_jax import models
from vitreg_jax.analysis import objective
from vitreg_jax.data import mixing
from vitreg_jax.training import objective as training_objective
from vitreg_jax.training import optim
from vitreg_jax.training import steps

VIT = dict(width=8, depth=1, mlp_dim=8, num_heads=2, patch_size=4, head_zeroinit=False)
WD, SMOOTHING, CLASSES = 0.05, 0.1, 3


def _setup(step: int):
  model = models.create("vit", CLASSES, **VIT)
  images = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 3))
  labels = np.array([0, 1, 2, 0, 1, 2])
  recipe = mixing.draw(mixing.DEFAULTS, seed=0, step=step, height=8, width=8)
  batch = {"image": images, "label": labels,
           **{k: np.repeat(np.asarray(v)[None], 6, axis=0) for k, v in recipe.items()}}
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  return model, variables, batch, recipe


def _train_step_ce(model, variables, batch):
  """The `ce` measurement of one real train step (zero learning rate) on `batch`."""
  return float(_jitted_train_step_ce(model, variables, batch))


@functools.partial(jax.jit, static_argnums=0)  # jitted as in training; one compilation
def _jitted_train_step_ce(model, variables, batch):
  tx = optax.sgd(0.0)
  state = steps.TrainState(step=jnp.int32(0), params=variables["params"],
                           opt_state=tx.init(variables["params"]), model_state={},
                           rng=jax.random.PRNGKey(7))
  objective = training_objective.Objective(model, num_classes=CLASSES,
                                           label_smoothing=SMOOTHING)
  _, measurements = steps.train_step(state, batch, objective=objective, tx=tx)
  return measurements["ce"]


@pytest.mark.parametrize("step", [0, 1, 2, 3])  # recipes with Mixup and with CutMix
def test_objective_is_the_training_loss_with_mixing_and_smoothing(step):
  model, variables, batch, recipe = _setup(step)
  assert float(recipe["mix_lam"]) < 1.0  # the batch is really mixed
  obj = objective.Objective(model, variables, num_classes=CLASSES, weight_decay=WD,
                            label_smoothing=SMOOTHING, l2="squared")
  l2 = objective.l2_penalty(variables["params"], WD)
  train_ce = _train_step_ce(model, variables, batch)
  expected = train_ce + float(l2)
  np.testing.assert_allclose(float(obj.loss(obj.theta, batch)), expected, rtol=1e-6)
  authors = objective.Objective(model, variables, num_classes=CLASSES, weight_decay=WD,
                                label_smoothing=SMOOTHING)  # the default L2 term
  np.testing.assert_allclose(float(authors.loss(authors.theta, batch)),
                             train_ce + WD * _norm_sum(variables["params"]), rtol=1e-6)
  plain = objective.Objective(model, variables, num_classes=CLASSES, weight_decay=WD,
                              label_smoothing=SMOOTHING, augment=False, l2="squared")
  unmixed = {"image": batch["image"], "label": batch["label"]}
  np.testing.assert_allclose(float(plain.loss(plain.theta, batch)),
                             float(obj.loss(obj.theta, unmixed)) - _smoothing_gap(obj, unmixed),
                             rtol=1e-6)
  assert abs(float(plain.loss(plain.theta, batch)) - expected) > 1e-3  # the flag matters


def _smoothing_gap(obj, batch):
  """CE with smoothing minus CE without it, on `batch` (no mixing)."""
  logits = obj.logits(obj.theta, batch["image"])
  onehot = jax.nn.one_hot(batch["label"], CLASSES)
  return float(steps.soft_cross_entropy(logits, onehot, SMOOTHING)
               - steps.soft_cross_entropy(logits, onehot))


def _norm_sum(params) -> float:
  """The authors' `ops/norm.py` `l2` by hand: every tensor's Frobenius norm, summed."""
  return sum(np.sqrt(np.sum(np.asarray(p, np.float64) ** 2)) for p in jax.tree.leaves(params))


def test_authors_l2_is_every_tensors_unsquared_norm_summed():
  model, variables, batch, _ = _setup(0)
  params = variables["params"]
  leaves = jax.tree.leaves(params)
  assert any(p.ndim == 1 for p in leaves)  # biases and LayerNorm scales are covered too
  obj = objective.Objective(model, variables, num_classes=CLASSES, weight_decay=WD)
  assert obj.l2 == "authors" and obj.description == f"CE + {WD:g} * sum_t ||w_t||_2"
  np.testing.assert_allclose(float(obj.penalty(obj.theta)), WD * _norm_sum(params), rtol=1e-6)
  np.testing.assert_allclose(float(objective.norm_sum(params)), _norm_sum(params), rtol=1e-6)
  # Not the squared form: the two differ on these parameters.
  assert abs(float(obj.penalty(obj.theta)) - float(objective.l2_penalty(params, WD))) > 1e-3
  # A restricted vector keeps the fixed tensors' norms as a constant; "none" drops the term.
  sub = obj.restrict("MlpBlock_0")
  np.testing.assert_allclose(float(sub.loss(sub.theta, batch)), float(obj.loss(obj.theta, batch)),
                             rtol=1e-6)
  none = obj.with_l2("none")
  measured = obj.measure(obj.theta, batch)
  np.testing.assert_allclose(float(none.loss(none.theta, batch)), float(measured["ce"]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="l2 must be one of"):
    obj.with_l2("l1")


def test_safe_norm_derivatives_are_the_norms_and_zero_at_zero():
  x = jnp.array([3.0, -4.0, 0.0])
  np.testing.assert_allclose(objective.safe_norm(x), 5.0)
  np.testing.assert_allclose(jax.grad(objective.safe_norm)(x), x / 5.0, rtol=1e-6)
  u = np.asarray(x, np.float64) / 5.0
  np.testing.assert_allclose(jax.hessian(objective.safe_norm)(x),
                             (np.eye(3) - np.outer(u, u)) / 5.0, rtol=1e-5, atol=1e-7)
  zero = jnp.zeros(3)  # a zero-initialized tensor: gradient and Hessian 0, not NaN
  assert float(objective.safe_norm(zero)) == 0.0
  assert not np.asarray(jax.grad(objective.safe_norm)(zero)).any()
  assert not np.asarray(jax.hessian(objective.safe_norm)(zero)).any()
  v = jnp.ones(3)
  hv = jax.jvp(jax.grad(objective.safe_norm), (zero,), (v,))[1]  # the HVP the analyses use
  assert not np.asarray(hv).any()


def test_l2_gradient_is_the_optimizers_weight_decay():
  model, variables, batch, _ = _setup(0)
  obj = objective.Objective(model, variables, num_classes=CLASSES, weight_decay=WD,
                            l2="squared")
  grad = obj.params(jax.grad(obj.penalty)(obj.theta))
  config = ml_collections.ConfigDict(dict(optimizer=dict(name="sgd", lr=1.0, momentum=0.0,
                                                         weight_decay=WD), schedule={}))
  tx, _ = optim.make_optimizer(config, total_steps=10)
  params = variables["params"]
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)  # -lr * (0 + wd * w) on decayed w
  jax.tree.map(lambda g, u: np.testing.assert_allclose(g, -u, atol=1e-7), grad, updates)
  assert any(np.abs(u).max() == 0 for u in jax.tree.leaves(updates))  # biases: not decayed


def test_restrict_keeps_the_loss_and_selects_by_regex():
  model, variables, batch, _ = _setup(0)
  obj = objective.Objective(model, variables, num_classes=CLASSES, weight_decay=WD)
  sub = obj.restrict("MlpBlock_0/Dense_0")
  assert sub.l2 == obj.l2 == "authors"
  assert sub.names == ("Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias",
                       "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")
  assert sub.theta.size == 8 + 8 * 8
  np.testing.assert_allclose(sub.loss(sub.theta, batch), obj.loss(obj.theta, batch), rtol=1e-6)
  assert int(obj.mask("MlpBlock_0/Dense_0").sum()) == sub.theta.size
  with pytest.raises(ValueError, match="matches none"):
    obj.restrict("no_such_layer")


def test_param_blocks_name_msa_mlp_and_conv_blocks():
  names = ["Transformer/encoderblock_0/LayerNorm_0/scale",
           "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
           "Transformer/encoderblock_0/LayerNorm_1/scale",
           "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel",
           "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel",
           "embedding/kernel", "head/kernel"]
  blocks = objective.param_blocks(names)
  assert [b[:2] for b in blocks] == [("block0/msa", "msa"), ("block0/mlp", "mlp"),
                                     ("block1/mlp", "mlp")]
  import re  # pylint: disable=g-import-not-at-top
  matched = [n for n in names if any(re.search(b[2], n) for b in blocks)]
  assert matched == names[:5]  # each block parameter once; embedding and head left out
  cnn = ["stage1_block0/Conv_0/kernel", "stage2_block1/attention/query/kernel",
         "stage2_block1/Conv_0/kernel", "stage2_block0/Conv_0/kernel", "stem_conv/kernel"]
  assert [b[:2] for b in objective.param_blocks(cnn)] == [
      ("stage1_block0", "conv"), ("stage2_block0", "conv"), ("stage2_block1", "msa")]
  with pytest.raises(ValueError, match="--params"):
    objective.param_blocks(["Dense_0/kernel"])
