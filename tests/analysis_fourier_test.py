"""Fourier analysis of feature maps: a known sinusoid, the diagonal read-out, every model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import errors
from vitreg_jax import models
from vitreg_jax.analysis import fourier

TINY = {
    "vit": dict(width=8, depth=2, mlp_dim=8, num_heads=2, patch_size=2),
    "arvit": dict(width=8, depth=2, num_heads=2, patch_size=2),
    "resnet": dict(depth=18, width=2),
    "alternet": dict(blocks_per_stage=(1, 2), msa_per_stage=(0, 1), heads=(1, 1), head_dim=2, msa_window=4,
                     width=2),
}


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_diagonal_sinusoid_peaks_at_its_frequency(k):
  n = 8
  a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  wave = np.cos(2 * np.pi * k * (a + b) / n) + 0.01  # frequency (2 pi k / n) on both axes
  fmap = np.broadcast_to(wave[None, :, :, None], (2, n, n, 3))
  freq, rel = fourier.half_diagonal(fourier.log_amplitude(fmap))
  np.testing.assert_allclose(freq, np.arange(5) / 4)  # 0, pi/4, ..., pi
  assert rel[0] == 0.0
  assert np.argmax(rel) == k if k else np.all(rel[1:] < -5)


def test_low_pass_map_decays_and_white_noise_is_flat():
  rng = np.random.default_rng(0)
  white = rng.normal(size=(64, 16, 16, 4))
  _, rel_white = fourier.half_diagonal(fourier.log_amplitude(white))
  # Bins 0 and pi are real (E log|x| lower by (log 2) / 2 than complex bins), hence 0.5.
  assert np.abs(rel_white).max() < 0.5
  smooth = (white + np.roll(white, 1, 1) + np.roll(white, 1, 2) + np.roll(white, (1, 1), (1, 2)))
  _, rel_smooth = fourier.half_diagonal(fourier.log_amplitude(smooth))
  assert rel_smooth[-1] < rel_smooth[1] < 0.5 and rel_smooth[-1] < -3  # zero of the filter at pi


def test_non_square_grid_reads_to_pi():
  logamp = np.arange(8 * 4, dtype=float).reshape(8, 4)
  freq, rel = fourier.half_diagonal(logamp)
  np.testing.assert_allclose(freq, [0, 0.5, 1])
  # Shifted centre (4, 2); points (4, 2), (6, 3), (8 % 8, 4 % 4) = (0, 0).
  np.testing.assert_allclose(rel, [0, logamp[6, 3] - logamp[4, 2], logamp[0, 0] - logamp[4, 2]])


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_gives_spatial_maps(name):
  model = models.create(name, 3, **TINY[name])
  images = jnp.zeros((2, 8, 16, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  maps = jax.eval_shape(lambda v, x: [m["map"] for m in fourier.feature_maps(model, v, x)],
                        variables, images)
  names = fourier.map_names(model, variables, images.shape[1:])
  assert len(maps) == len(names)
  if name in ("vit", "arvit"):
    assert [k for _, k in names] == ["embed", "msa", "mlp", "msa", "mlp"]
    assert all(m.shape == (2, 4, 8, 8) for m in maps)  # CLS dropped, 4 x 8 patch grid
  else:
    kinds = [k for _, k in names]
    assert kinds[0] == "stem" and all(m.ndim == 4 and m.shape[0] == 2 for m in maps)
    assert ("msa" in kinds) == (name == "alternet")


def test_spectra_of_a_tiny_vit():
  model = models.create("vit", 3, **TINY["vit"])
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  blocks = fourier.spectra(model, variables, [{"image": images[:2]}, {"image": images[2:]}])
  assert [b["name"] for b in blocks] == ["embedding", "block0/attn", "block0/mlp",
                                         "block1/attn", "block1/mlp"]
  np.testing.assert_allclose([b["depth"] for b in blocks], [0, 0.25, 0.5, 0.75, 1])
  for b in blocks:
    assert b["freq"] == [0.0, 0.5, 1.0] and b["rel_log_amp"][0] == 0.0
    assert np.isfinite(b["rel_log_amp"]).all()
  # Averaging two batches equals one batch of all four.
  whole = fourier.spectra(model, variables, [{"image": images}])
  np.testing.assert_allclose([b["rel_log_amp"] for b in blocks],
                             [b["rel_log_amp"] for b in whole], atol=1e-5)


def test_a_map_too_small_for_a_frequency_is_a_user_error():
  # An ImageNet-stem ResNet's last stage on small images: 1 x 1 maps have no frequency > 0.
  with pytest.raises(errors.UserError, match="at least 2x2"):
    fourier.half_diagonal(np.zeros((1, 1)))
