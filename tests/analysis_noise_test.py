"""Frequency-band noise: its spectrum, its norm, and the sweep on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import models
from vitreg_jax.analysis import noise


@pytest.mark.parametrize("freq", [0.0, 0.5, 1.0])
def test_band_noise_lives_in_its_band_with_fixed_norm(freq):
  shape = (3, 16, 16, 2)
  x = noise.band_noise(jax.random.PRNGKey(0), shape, freq, 0.2, eps=0.3)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(x).reshape(3, -1), axis=1),
                             0.3 * np.sqrt(16 * 16 * 2), rtol=1e-4)
  power = np.abs(np.fft.fft2(np.asarray(x), axes=(1, 2))) ** 2
  inside = noise.band_mask(16, 16, freq, 0.2)
  assert power[:, ~inside].sum() < 1e-6 * power.sum()
  radius = np.maximum(*np.meshgrid(np.abs(np.fft.fftfreq(16)) * 2,
                                   np.abs(np.fft.fftfreq(16)) * 2, indexing="ij"))
  centre = (power.sum((0, 3)) * radius).sum() / power.sum()
  assert abs(centre - freq) <= 0.1 + 1e-6


def test_empty_band_is_a_clear_error():
  with pytest.raises(ValueError, match="bandwidth"):
    noise.band_noise(jax.random.PRNGKey(0), (1, 4, 4, 1), 0.3, 0.05, 1.0)


def test_sweep_on_a_tiny_model():
  model = models.create("resnet", 2, depth=18, width=2)
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  logits, _ = model.apply(variables, images)
  labels = jnp.argmax(logits, -1)  # the model is right on every clean image
  batches = [{"image": images, "label": labels}]
  res = noise.frequency_sweep(model, variables, batches, [0.0, 1.0], eps=1e-6, bandwidth=0.2,
                              key=jax.random.PRNGKey(2))
  assert res["clean_error"] == 0.0 and res["num_examples"] == 8
  assert res["error_increase"] == res["error"] and max(res["error"]) <= 0.25
  big = noise.frequency_sweep(model, variables, batches, [0.0], eps=100.0, bandwidth=0.2,
                              key=jax.random.PRNGKey(2))
  assert 0 <= big["error"][0] <= 1


def test_corruption_choice():
  class Run:
    class config:  # pylint: disable=invalid-name
      class data:  # pylint: disable=invalid-name
        name = "cifar10_corrupted"
  assert noise.corruption_dataset(Run, "auto") == "cifar10_corrupted"
  assert noise.corruption_dataset(Run, "none") is None
  with pytest.raises(ValueError, match="corruption"):
    noise.corruption_dataset(Run, "imagenet_c")
