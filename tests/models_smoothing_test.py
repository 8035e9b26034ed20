"""Spatial smoothing (the authors' blur block) against a NumPy transcription, in the ResNets
and AlterNet, placed as the authors place it per family, and in the feature maps the analyses
read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import models
from vitreg_jax.analysis import fourier
from vitreg_jax.models import resnet


def np_smooth(x, temperature, padding):
  """`t tanh(x / t)`, ReLU, then every 2x2 window (stride 1) of the zero-padded map / 4."""
  y = np.maximum(temperature * np.tanh(x / temperature), 0.0)
  pad = ((0, 0), (1, 1), (1, 1), (0, 0)) if padding == "authors" else ((0, 0), (0, 1), (0, 1),
                                                                        (0, 0))
  p = np.pad(y, pad)
  b, h, w, c = p.shape
  out = np.zeros((b, h - 1, w - 1, c))
  for i in range(h - 1):
    for j in range(w - 1):
      out[:, i, j] = (p[:, i, j] + p[:, i + 1, j] + p[:, i, j + 1] + p[:, i + 1, j + 1]) / 4
  return out


@pytest.mark.parametrize("padding,temperature", [("authors", 10.0), ("same", 10.0),
                                                 ("authors", 0.5)])
def test_smooth_matches_numpy(padding, temperature):
  x = np.random.default_rng(0).normal(scale=20.0, size=(2, 5, 4, 3))  # tanh saturates
  got = resnet.smooth(jnp.asarray(x, jnp.float32), temperature, padding)
  want = np_smooth(x, temperature, padding)
  assert got.shape == ((2, 6, 5, 3) if padding == "authors" else (2, 5, 4, 3))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resnet_smooths_every_stage_end():
  kw = dict(depth=18, width=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8, 3))
  plain = models.create("resnet", 3, **kw)
  smooth = models.create("resnet", 3, smoothing=True, **kw)
  variables = smooth.init(jax.random.PRNGKey(1), x)
  # No parameters of its own: the same checkpoint loads with and without smoothing.
  assert jax.tree.structure(variables) == jax.tree.structure(plain.init(jax.random.PRNGKey(1), x))
  _, out = smooth.apply(variables, x)
  for s, last in zip(range(1, 5), (1, 3, 5, 7)):  # two blocks per stage
    block = out[f"block{last}"]
    np.testing.assert_allclose(block["smoothed"], np_smooth(np.asarray(block["output"]), 10.0,
                                                            "authors"), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[f"stage{s}"], block["smoothed"])
    if s < 4:
      np.testing.assert_array_equal(out[f"block{last + 1}"]["input"], block["smoothed"])
  # Authors' padding: 16 -> 17, stride 2 -> 9 -> 10, 5 -> 6, 3 -> 4.
  assert [out[f"stage{s}"].shape[1] for s in range(1, 5)] == [17, 10, 6, 4]
  assert not np.allclose(smooth.apply(variables, x)[0], plain.apply(variables, x)[0])


def _smoothed_stages(out):
  return [s for s in range(1, 5) if "smoothed" in out[f"block{2 * s - 1}"]]


def test_placement_per_family_as_the_authors():
  """Post-activation `resnet`: after every stage (their models/resnet.py, (1, 1, 1, 1));
  pre-activation `preresnet`: not after the last (their models/preresnet.py, (1, 1, 1, 0));
  `smoothing_stages` overrides both (a count of blur blocks per stage)."""
  kw = dict(depth=18, width=2, smoothing=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8, 3))
  placements = {}
  for name, extra in [("resnet", {}), ("preresnet", {}),
                      ("preresnet", dict(smoothing_stages=(1, 1, 1, 1))),
                      ("resnet", dict(smoothing_stages=[2, 0, 0, 0]))]:
    model = models.create(name, 3, **kw, **extra)
    _, out = model.apply(model.init(jax.random.PRNGKey(1), x), x)
    placements[(name, tuple(extra.get("smoothing_stages", ())))] = _smoothed_stages(out)
    if name == "preresnet" and not extra:
      np.testing.assert_array_equal(out["stage4"], out["block7"]["output"])
      assert out["stage4"].shape[1:3] == (3, 2)   # 17 -> 9 -> 10 -> 5 -> 6 -> 3, unsmoothed
    if extra.get("smoothing_stages") == [2, 0, 0, 0]:
      once = np_smooth(np.asarray(out["block1"]["output"]), 10.0, "authors")
      np.testing.assert_allclose(out["block1"]["smoothed"], np_smooth(once, 10.0, "authors"),
                                 rtol=1e-5, atol=1e-5)
  assert placements == {("resnet", ()): [1, 2, 3, 4], ("preresnet", ()): [1, 2, 3],
                        ("preresnet", (1, 1, 1, 1)): [1, 2, 3, 4], ("resnet", (2, 0, 0, 0)): [1]}


def test_alternet_smoothing_needs_same_padding():
  kw = dict(width=2, blocks_per_stage=(1, 2), msa_per_stage=(0, 1), heads=(1, 1), head_dim=2,
            msa_window=4)
  with pytest.raises(ValueError, match="smoothing_padding='same'"):
    models.create("alternet", 3, smoothing=True, **kw)
  model = models.create("alternet", 3, smoothing=True, smoothing_padding="same", **kw)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  _, out = model.apply(variables, x)
  assert out["stage1"].shape[1:3] == (16, 8) and out["stage2"].shape[1:3] == (8, 4)
  np.testing.assert_allclose(out["block0"]["smoothed"],
                             np_smooth(np.asarray(out["block0"]["output"]), 10.0, "same"),
                             rtol=1e-5, atol=1e-5)
  # Pre-activation, like the authors' AlterNet: smoothed after every stage but the last.
  names = fourier.map_names(model, variables, x.shape[1:])
  assert names == [("stem", "stem"), ("block0", "conv"), ("block0/smooth", "smooth"),
                   ("block1", "conv"), ("block2", "msa")]
  every = models.create("alternet", 3, smoothing=True, smoothing_padding="same",
                        smoothing_stages=(1, 1), **kw)
  assert fourier.map_names(every, variables, x.shape[1:])[-1] == ("block2/smooth", "smooth")
  # Smoothing only the last stage leaves every MSA map unchanged: 'authors' padding is fine.
  models.create("alternet", 3, smoothing=True, smoothing_stages=(0, 1), **kw)


def test_bad_smoothing_settings_fail_at_construction():
  with pytest.raises(ValueError, match="smoothing_padding must be one of"):
    models.create("resnet", 3, smoothing=True, smoothing_padding="valid")
  with pytest.raises(ValueError, match="smoothing_temperature must be > 0"):
    models.create("resnet", 3, smoothing=True, smoothing_temperature=0.0)
  with pytest.raises(ValueError, match="smoothing_stages applies with smoothing=True"):
    models.create("preresnet", 3, smoothing_stages=(1, 1, 1, 1))
  with pytest.raises(ValueError, match="for each of the 4 stages"):
    models.create("resnet", 3, smoothing=True, smoothing_stages=(1, 1, 1))
  with pytest.raises(ValueError, match="for each of the 2 stages"):
    models.create("alternet", 3, blocks_per_stage=(1, 2), msa_per_stage=(0, 1), heads=(1, 1),
                  smoothing=True, smoothing_stages=(1, -1))
