"""Frequency-band noise: its spectrum, its norm, and the sweep on a tiny model."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import models
from vitreg_jax.analysis import noise

import testutil  # pylint: disable=g-bad-import-order


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


def _authors_center_mask(w1, w2):
  """ops/adversarial.py `FreqAttack._center_mask`, transcribed: a [w2, w2] mask of a centred
  w1 x w1 square of ones (clamped to [0, w2]), padded by int((w2 - w1) / 2) on every side."""
  w1 = w2 if w1 > w2 else w1
  w1 = 0 if w1 < 0 else w1
  return np.pad(np.ones([w1, w1]), [int((w2 - w1) / 2)] * 2)


def _authors_freq_attack_noise(delta_nchw, f, s=0.2):
  """ops/adversarial.py `FreqAttack._fourier_mask` on the perturbation `xs_adv - xs`,
  transcribed to NumPy (square images, their layout [B, C, H, W]): FFT, roll by half, amplitude
  times the ring mask with the phase kept, roll by half, inverse FFT, real part."""
  _, _, h, w = delta_nchw.shape
  shift = lambda x: np.roll(x, (int(h / 2), int(w / 2)), axis=(2, 3))
  x = shift(np.fft.fft2(delta_nchw))
  x_abs, x_ang = np.abs(x), np.angle(x)
  mask = (_authors_center_mask(int(((f + s) * h) / (2 * math.pi)) * 2, h)
          - _authors_center_mask(int(((f - s) * h) / (2 * math.pi)) * 2, h))
  x = (mask * x_abs) * np.exp(1j * x_ang)
  return np.fft.ifft2(shift(x)).real


@pytest.mark.parametrize("freq", [0.0, 0.1, 0.35, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("size", [8, 16, 32])
def test_code_variant_equals_the_authors_freq_attack(freq, size):
  key, shape, eps = jax.random.PRNGKey(3), (2, size, size, 3), 0.05
  ours = np.asarray(noise.ring_noise(key, shape, freq, 0.2, eps))
  sign = eps * np.sign(np.asarray(jax.random.normal(key, shape)))  # their Random attack
  theirs = _authors_freq_attack_noise(sign.transpose(0, 3, 1, 2), freq * math.pi, 0.2)
  np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), atol=1e-5)
  # Their rule leaves small images' low rings empty (8 px, f = 0: 2 int(0.2 * 8 / 2 pi) = 0).
  assert (np.abs(theirs).max() > 0) == bool(noise.ring_mask(size, size, freq * math.pi).any())
  assert size < 32 or np.abs(theirs).max() > 0  # at 32 px every ring holds frequencies


def test_code_variant_on_non_square_images_applies_their_rule_per_axis():
  # 32 x 16 (the dominoes): their centred square's 1-D profile, rows with H = 32, columns with
  # W = 16, for the outer (f + s) and inner (f - s) squares.
  f, s = 0.5 * math.pi, 0.2
  def rect(g):
    side = lambda n: int(g * n / (2 * math.pi)) * 2
    profile = lambda n: _authors_center_mask(side(n), n).max(axis=0)
    return np.outer(profile(32), profile(16))
  np.testing.assert_array_equal(noise.ring_mask(32, 16, f, s), rect(f + s) - rect(f - s))
  assert noise.ring_mask(32, 16, f, s).sum() > 0


def test_code_noise_is_not_renormalized_high_frequencies_carry_more_energy():
  shape = (4, 32, 32, 3)
  energy = [float(np.sum(np.asarray(noise.ring_noise(jax.random.PRNGKey(0), shape, f, 0.2,
                                                     1.0)) ** 2)) for f in (0.0, 0.5, 1.0)]
  assert energy[0] * 20 < energy[1] < energy[2]
  equal = [float(np.sum(np.asarray(noise.band_noise(jax.random.PRNGKey(0), shape, f, 0.1,
                                                    1.0)) ** 2)) for f in (0.0, 0.5, 1.0)]
  np.testing.assert_allclose(equal, equal[0], rtol=1e-4)


def test_odd_sizes_are_refused_by_the_code_variant():
  with pytest.raises(ValueError, match="even image sizes"):
    noise.ring_mask(15, 16, 1.0)


def test_equal_energy_variant_equals_its_numpy_transcription():
  key, shape, freq, bw, eps = jax.random.PRNGKey(5), (2, 16, 8, 3), 0.5, 0.2, 0.3
  ours = np.asarray(noise.make_noise("equal_energy", eps=eps, bandwidth=bw)(key, shape, freq))
  white = np.asarray(jax.random.normal(key, shape), np.float64)
  wy, wx = np.abs(np.fft.fftfreq(16)) * 2, np.abs(np.fft.fftfreq(8)) * 2
  band = np.abs(np.maximum(wy[:, None], wx[None, :]) - freq) <= bw / 2 + 1e-9
  x = np.fft.ifft2(np.fft.fft2(white, axes=(1, 2)) * band[None, :, :, None], axes=(1, 2)).real
  x *= eps * np.sqrt(16 * 8 * 3) / np.linalg.norm(x.reshape(2, -1), axis=1)[:, None, None, None]
  np.testing.assert_allclose(ours, x, atol=1e-5)


def test_empty_band_is_a_clear_error():
  with pytest.raises(ValueError, match="bandwidth"):
    noise.band_noise(jax.random.PRNGKey(0), (1, 4, 4, 1), 0.3, 0.05, 1.0)


def test_sweep_on_a_tiny_model():
  # Pre-activation: at random init a post-activation ResNet's pooled features are all >= 0
  # (ReLU'd block outputs) and this tiny one gives every image the same class, noise or not.
  model = models.create("preresnet", 2, depth=18, width=2)
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 3))
  # Jitted: op by op, a ResNet-18's init and forward pass take most of a minute.
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), images)
  logits, _ = jax.jit(model.apply)(variables, images)
  labels = jnp.argmax(logits, -1)  # the model is right on every clean image
  batches = [{"image": images, "label": labels}]
  tiny = noise.make_noise("equal_energy", eps=1e-6, bandwidth=0.2)
  res = noise.frequency_sweep(model, variables, batches, [0.0, 1.0], noise_fn=tiny,
                              key=jax.random.PRNGKey(2))
  assert res["clean_error"] == 0.0 and res["num_examples"] == 8
  assert res["error_increase"] == res["error"] and max(res["error"]) <= 0.25
  big = noise.frequency_sweep(model, variables, batches, [0.0, 1.0],
                              noise_fn=noise.make_noise("code", eps=100.0),
                              key=jax.random.PRNGKey(2))
  assert all(0 <= e <= 1 for e in big["error"]) and big["error"][1] > 0


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
  testutil.write_cifar100_corrupted(tmp_path / "CIFAR-100-C")
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
