"""Frequency-band noise: its spectrum, its norm, and the sweep on a tiny model."""

import flax.linen as nn
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


class _SeverityReader(nn.Module):
  """Predicts the first label of each severity block of the generated CIFAR-100-C (the images
  of severity s are all 40 s / 255 after normalization with mean 0, std 1), so it is right on
  exactly 1 of the 3 examples of every corrupted split, and on none if splits were mixed up."""

  @nn.compact
  def __call__(self, images, train=False):
    del train
    severity = jnp.round(images.mean((1, 2, 3)) * 255 / 40)
    first_label = 3 * (severity - 1)
    logits = -jnp.abs(jnp.arange(100)[None] - first_label[:, None])
    return logits + 0 * self.param("unused", nn.initializers.zeros, ()), {}


def test_corruption_accuracy_reads_every_severity_split(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data_sources_test import _write_c100c  # pylint: disable=g-import-not-at-top
  _write_c100c(tmp_path / "CIFAR-100-C")
  model = _SeverityReader()
  run = type("Run", (), dict(
      model=model, variables=model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))),
      config=ml_collections.ConfigDict(dict(data=dict(
          name="cifar100", manual_dir=str(tmp_path), corruptions=("fog", "snow"),
          num_threads=1, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))))))
  with tfds.testing.mock_data(num_examples=6):
    result = noise.corruption_accuracy(run, "cifar100_corrupted", batch_size=2)
  assert sorted(result["accuracy"]) == [f"{c}_{s}" for c in ("fog", "snow") for s in range(1, 6)]
  np.testing.assert_allclose(list(result["accuracy"].values()), 1 / 3)
  assert result["mean_corruption_accuracy"] == pytest.approx(1 / 3)
  assert sorted(result["nll"]) == sorted(result["ece"]) == sorted(result["accuracy"])
  assert result["mean_corruption_nll"] == pytest.approx(np.mean(list(result["nll"].values())))
  assert result["mean_corruption_ece"] == pytest.approx(np.mean(list(result["ece"].values())))
  # Right on one of three examples with the softmax of integer-spaced logits: NLL > 0, and the
  # confident wrong predictions leave a large calibration error.
  assert min(result["nll"].values()) > 0 and 0 < result["mean_corruption_ece"] <= 1
