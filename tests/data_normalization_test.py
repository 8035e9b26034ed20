"""uint8 batches are normalized on the device: the host hands over uint8, and a train / eval
step on it equals the step on the host-normalized float32 batch (with and without Mixup)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitreg_jax import data
from vitreg_jax import models
from vitreg_jax import sharding
from vitreg_jax.data import device_normalization
from vitreg_jax.data import mixing
from vitreg_jax.data import preprocess
from vitreg_jax.training import inflight
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import steps

CFG = {"name": "dominoes", "num_train": 64, "num_val": 16, "num_test": 16, "num_threads": 1}
MIX = {"mixup_alpha": 1.0, "cutmix_alpha": 1.0, "prob": 1.0}


def _batch(mixup, step=0):
  it = data.open({**CFG, "mixup": mixup}).train_iterator(
      global_batch_size=8, seed=1, start_step=step, process_index=0, process_count=1)
  return next(it)


def _state(model, tx, shape):
  variables = dict(model.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32)))
  params = variables.pop("params")
  params = jax.tree.map(lambda p: p + 0.01, params)  # The zero head would hide differences.
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model_state=variables,
                          rng=jax.random.key(1))


def test_device_normalization_equals_host_normalization():
  norm = device_normalization.Normalization(preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
  x = np.random.default_rng(0).integers(0, 256, (2, 5, 3, 3)).astype(np.uint8)
  mean, std = np.asarray(preprocess.IMAGENET_MEAN), np.asarray(preprocess.IMAGENET_STD)
  expected = (x / 255.0 - mean) / std
  np.testing.assert_allclose(jax.jit(norm)(x), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norm.host(x), expected, rtol=1e-5, atol=1e-5)
  f = np.ones((1, 2, 2, 3), np.float32)
  assert norm(f) is not None and np.array_equal(norm(f), f)  # floats: already normalized
  with pytest.raises(TypeError, match="uint8"):
    norm(x.astype(np.int32))
  with pytest.raises(ValueError, match="std > 0"):
    device_normalization.Normalization((0.5,) * 3, (0.5, 0.5, 0.0))


@pytest.mark.parametrize("mixup", [None, MIX], ids=["plain", "mixup_cutmix"])
def test_train_and_eval_step_on_uint8_equal_the_float_path(mixup):
  batch = _batch(mixup)
  assert batch["image"].dtype == np.uint8  # what the host hands over
  norm = data.open(CFG).normalization
  assert norm == device_normalization.Normalization(preprocess.HALF, preprocess.HALF)
  if mixup:
    assert batch["mix_lam"][0] < 1  # the recipe really mixes this batch
  device_keys = ("image", "label", *mixing.BATCH_KEYS)
  uint8 = {k: jnp.asarray(v) for k, v in batch.items() if k in device_keys}
  floats = dict(uint8, image=jnp.asarray(norm.host(batch["image"])))
  model = models.create("vit", 2, width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4)
  tx = optax.adamw(1e-2)
  state = _state(model, tx, batch["image"].shape[1:])
  step = functools.partial(steps.train_step, tx=tx,
                           objective=objective_lib.Objective(model, num_classes=2))
  got_state, got = jax.jit(functools.partial(step, normalize=norm))(state, uint8)
  want_state, want = jax.jit(step)(state, floats)
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got_state.params, want_state.params)
  assert not np.allclose(got_state.params["head"]["kernel"], state.params["head"]["kernel"])

  evaluate = functools.partial(steps.eval_step, model=model)
  got = jax.jit(functools.partial(evaluate, normalize=norm))(state, uint8, None)
  want = jax.jit(evaluate)(state, floats, None)
  np.testing.assert_array_equal(got["pred"], want["pred"])
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)


def test_uint8_without_normalization_is_a_clear_error():
  batch = _batch(None)
  model = models.create("vit", 2, width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4)
  tx = optax.sgd(0.1)
  state = _state(model, tx, batch["image"].shape[1:])
  step = functools.partial(steps.train_step, tx=tx,
                           objective=objective_lib.Objective(model, num_classes=2))
  with pytest.raises(TypeError, match=r"normalize=data.open\(config.data\).normalization"):
    jax.jit(step)(state, {"image": batch["image"], "label": batch["label"]})


def test_prefetch_to_device_keeps_uint8_and_the_mixup_recipe():
  mesh = sharding.make_mesh()
  batch = _batch(MIX)
  (got,) = list(inflight.prefetch_to_device([batch], mesh))
  assert set(got) == {"image", "label", *mixing.BATCH_KEYS}  # attributes stay on the host
  assert got["image"].dtype == jnp.uint8
  np.testing.assert_array_equal(got["mix_box"], batch["mix_box"])
