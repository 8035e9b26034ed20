"""Feature-map variance against NumPy, over batches, per block of every model family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import models
from vitreg_jax import sharding
from vitreg_jax.analysis import variance


def np_variance(fmap):
  """Mean over examples and channels of the spatial variance (Bessel-corrected), by loops."""
  b, h, w, c = fmap.shape
  values = []
  for i in range(b):
    for k in range(c):
      points = fmap[i, :, :, k].astype(np.float64).ravel()
      values.append(np.sum((points - points.mean()) ** 2) / (h * w - 1))
  return np.mean(values)


def test_map_variance_matches_numpy():
  fmap = np.random.default_rng(0).normal(loc=3.0, scale=2.0, size=(3, 4, 5, 6))
  fmap[1] *= 10  # examples with different scales: the mean is over examples
  np.testing.assert_allclose(variance.map_variance(fmap), np_variance(fmap), rtol=1e-5)
  assert float(variance.map_variance(np.ones((2, 3, 3, 4)))) == 0.0


def test_vit_blocks_against_numpy_and_batches_weighted_by_size():
  model = models.create("vit", 3, width=8, depth=2, mlp_dim=8, num_heads=2, patch_size=2)
  images = jax.random.normal(jax.random.PRNGKey(0), (5, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  blocks = variance.variances(model, variables, [{"image": images[:2]}, {"image": images[2:]}],
                              sharding.make_mesh())
  assert [b["name"] for b in blocks] == ["embedding", "block0/attn", "block0/mlp",
                                         "block1/attn", "block1/mlp"]
  _, out = model.apply(variables, images)
  grid = lambda t: np.asarray(t)[:, 1:].reshape(5, 4, 4, 8)  # CLS dropped, 4 x 4 patches
  want = [out["block0"]["input"], out["block0"]["after_attn"], out["block0"]["output"],
          out["block1"]["after_attn"], out["block1"]["output"]]
  np.testing.assert_allclose([b["variance"] for b in blocks],
                             [np_variance(grid(t)) for t in want], rtol=1e-4)
  assert all(b["shape"] == [4, 4] and not b["subsampling"] for b in blocks)


@pytest.mark.parametrize("smoothing", [False, True])
def test_resnet_subsampling_and_smoothing_maps(smoothing):
  model = models.create("resnet", 3, depth=18, width=2, smoothing=smoothing)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  blocks = variance.variances(model, variables, [{"image": images}])
  _, out = model.apply(variables, images)
  by_name = {b["name"]: b for b in blocks}
  np.testing.assert_allclose(by_name["block2"]["variance"],
                             np_variance(np.asarray(out["block2"]["output"])), rtol=1e-4)
  assert [b["name"] for b in blocks if b["subsampling"]] == ["block2", "block4", "block6"]
  smooth = [b["name"] for b in blocks if b["kind"] == "smooth"]
  assert smooth == (["block1/smooth", "block3/smooth", "block5/smooth", "block7/smooth"]
                    if smoothing else [])
