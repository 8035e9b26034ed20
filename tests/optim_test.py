"""Tests for vitreg_jax.training.optim: schedules, weight-decay masks and config validation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vitreg_jax.training import optim


def _config(optimizer, schedule):
  return ml_collections.ConfigDict({"optimizer": optimizer, "schedule": schedule})


def test_cosine_with_warmup_endpoints():
  sched = optim.make_schedule({"name": "cosine", "warmup_steps": 10}, 1.0, 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 0.5, rtol=1e-5)  # Half-way through the cosine.
  assert float(sched(110)) < 1e-6


def test_step_schedule_in_epochs_matches_div_recipe():
  # Authors' MNIST-CIFAR recipe: decay x0.1 at epochs 70 and 80 of 100.
  sched = optim.make_schedule(
      {"name": "step", "boundary_epochs": (70, 80), "decay_factor": 0.1}, 1e-3, 1000,
      steps_per_epoch=10)
  np.testing.assert_allclose(float(sched(699)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(701)), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(float(sched(801)), 1e-5, rtol=1e-5)


def test_epoch_fields_need_steps_per_epoch():
  with pytest.raises(ValueError, match="epochs"):
    optim.make_schedule({"name": "step", "boundary_epochs": (1,)}, 1.0, 100)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_skips_1d_params_by_default(name):
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}
  tx, _ = optim.make_optimizer(
      _config({"name": name, "lr": 0.1, "weight_decay": 0.5}, {"name": "constant"}), 10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert float(jnp.abs(updates["kernel"]).sum()) > 0  # Decayed.
  np.testing.assert_array_equal(np.asarray(updates["bias"]), 0.0)  # Not decayed.


def test_grad_clipping():
  params = {"w": jnp.zeros((4,))}
  tx, _ = optim.make_optimizer(
      _config({"name": "sgd", "lr": 1.0, "momentum": 0.0, "grad_clip_norm": 1.0},
              {"name": "constant"}), 10)
  updates, _ = tx.update({"w": jnp.full((4,), 10.0)}, tx.init(params), params)
  np.testing.assert_allclose(float(optax.global_norm(updates)), 1.0, rtol=1e-5)


def test_unknown_names_and_fields_list_valid_choices():
  with pytest.raises(ValueError, match="Valid optimizers"):
    optim.make_optimizer(_config({"name": "lion"}, {}), 10)
  with pytest.raises(ValueError, match="Valid fields"):
    optim.make_optimizer(_config({"name": "adam", "learning_rate": 1.0}, {}), 10)
  with pytest.raises(ValueError, match="Valid schedules"):
    optim.make_schedule({"name": "poly"}, 1.0, 10)


# --------------------------------------------------------------------------- SAM


def _sam_reference_step(loss, w, lr, rho):
  """SAM by hand (Foret et al. 2021, Alg. 1): w - lr * grad L(w + rho * g / ||g||)."""
  g = jax.grad(loss)(w)
  adv = jax.tree.map(lambda p, d: p + rho * d / optax.global_norm(g), w, g)
  return jax.tree.map(lambda p, d: p - lr * d, w, jax.grad(loss)(adv))


def test_sam_matches_the_papers_update_on_a_nonquadratic_loss():
  loss = lambda w: jnp.sum(jnp.sin(w["a"]) * w["b"] ** 2) + jnp.sum(w["a"] ** 4)
  w = {"a": jnp.array([0.3, -1.2, 0.7]), "b": jnp.array([[1.5], [-0.4]])}
  tx, _ = optim.make_optimizer(_config(
      {"name": "sam", "base": "sgd", "momentum": 0.0, "lr": 0.1, "rho": 0.2},
      {"name": "constant"}), 10)
  state = tx.init(w)
  updates, state = tx.update(jax.grad(loss)(w), state, w,
                             grad_fn=lambda p, _: jax.grad(loss)(p))
  got = optax.apply_updates(w, updates)
  want = _sam_reference_step(loss, w, 0.1, 0.2)
  for k in w:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)
  # Not plain SGD: the adversarial point changes the gradient.
  sgd = jax.tree.map(lambda p, d: p - 0.1 * d, w, jax.grad(loss)(w))
  assert float(jnp.abs(got["a"] - sgd["a"]).max()) > 1e-3


def test_sam_train_step_with_a_regularizer_matches_the_reference():
  from vitreg_jax import models  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import objective as objective_lib  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import steps  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({
      "optimizer": {"name": "sam", "base": "sgd", "momentum": 0.0, "lr": 0.5, "rho": 0.1},
      "schedule": {"name": "constant"}})
  model = models.create("vit", 3, width=16, depth=1, mlp_dim=16, num_heads=2, patch_size=4)
  objective = objective_lib.Objective(model, num_classes=3,
                                      regularizers=[dict(name="div", weight=1.0, layers=(0,))])
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 1], jnp.int32)
  params = model.init(jax.random.key(0), images[:1])["params"]
  # A zero-initialized head has zero input gradients, so DIV would be 0: use a random one.
  params["head"]["kernel"] = jnp.asarray(rng.normal(size=params["head"]["kernel"].shape),
                                         jnp.float32)
  tx, _ = optim.make_optimizer(config, 10)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), model_state={},
                           rng=jax.random.key(1))

  def loss(p):  # The train step's objective: cross-entropy + the DIV term.
    logits, _, reg, terms, _ = objective.forward(
        {"params": p}, images, labels=labels, train=True,
        rngs={"dropout": jax.random.fold_in(state.rng, 0)}, head_mask=None, mutable=False)
    return steps.soft_cross_entropy(logits, jax.nn.one_hot(labels, 3)) + reg

  new_state, m = jax.jit(lambda s: steps.train_step(
      s, {"image": images, "label": labels}, objective=objective, tx=tx))(state)
  # Jitted: eager double backprop dispatches (and compiles) op by op, which is slow.
  want, grad = jax.jit(lambda p: (_sam_reference_step(loss, p, 0.5, 0.1),
                                  jax.grad(loss)(p)))(params)
  flat = lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)])
  step_got, step_want = flat(new_state.params) - flat(params), flat(want) - flat(params)
  sgd_step = -0.5 * flat(grad)
  # float32 double backprop, jitted vs not: agree to 1e-3 of the step, far closer than SGD.
  err = float(jnp.linalg.norm(step_got - step_want) / jnp.linalg.norm(step_want))
  assert err < 1e-3, err
  assert float(jnp.linalg.norm(sgd_step - step_want) / jnp.linalg.norm(step_want)) > 1e-2
  assert float(m["reg/div"]) > 0 and bool(m["finite"])


def test_sam_fields_are_checked():
  with pytest.raises(ValueError, match="SAM fields"):
    optim.make_optimizer(_config({"name": "sgd", "rho": 0.1}, {}), 10)
  with pytest.raises(ValueError, match="base must be one of"):
    optim.make_optimizer(_config({"name": "sam", "base": "lion"}, {}), 10)
  with pytest.raises(ValueError, match="rho > 0"):
    optim.make_optimizer(_config({"name": "sam", "rho": 0.0}, {}), 10)
