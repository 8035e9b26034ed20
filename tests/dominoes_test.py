"""Tests for the embedded dominoes dataset (vitreg_jax.data.dominoes): no training, small sizes."""

import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax.data import dominoes
from vitreg_jax.data import tiles

SMALL = dict(num_train=400, num_val=200, num_test=201)  # odd size: checks exact class counts


@pytest.fixture(scope='module')
def small_splits():
  return {split: dominoes.load(split, seed=3, **SMALL) for split in dominoes.SPLITS}


def test_contract_constants():
  assert dominoes.SPLITS == ('train', 'val_id', 'val_ood', 'test_id', 'test_ood')
  assert dominoes.NUM_CLASSES == 2
  assert dominoes.IMAGE_SHAPE == (32, 16, 3)
  assert dominoes.ATTRIBUTES == ('spurious',)


def test_shapes_dtypes_and_sizes(small_splits):
  sizes = {'train': 400, 'val_id': 200, 'val_ood': 200, 'test_id': 201, 'test_ood': 201}
  for split, ds in small_splits.items():
    assert set(ds) == {'image', 'label', 'spurious'}
    n = sizes[split]
    assert ds['image'].shape == (n, *dominoes.IMAGE_SHAPE) and ds['image'].dtype == np.uint8
    for key in ('label', 'spurious'):
      assert ds[key].shape == (n,) and ds[key].dtype == np.int32
      assert set(np.unique(ds[key])) <= {0, 1}
    # Images use the range: black digit background, white strokes, mid-gray photo crops.
    assert ds['image'].min() == 0 and ds['image'].max() == 255


def test_default_sizes():
  assert dominoes.load('val_ood')['label'].shape == (dominoes.DEFAULT_OPTIONS['num_val'],)


def test_label_balance_and_exact_agreement(small_splits):
  for split, ds in small_splits.items():
    label, spurious = ds['label'], ds['spurious']
    n = len(label)
    assert np.bincount(label, minlength=2).tolist() == [n // 2, n - n // 2]
    p = 0.5 if split.endswith('_ood') else 0.9
    for c in (0, 1):
      n_c = int((label == c).sum())
      # Exactly round(p * n_c) examples of class c show the matching digit.
      assert int((spurious[label == c] == c).sum()) == int(round(p * n_c)), (split, c)
    assert abs(np.mean(label == spurious) - p) < 0.01, split


def test_spurious_agreement_option_and_ood_independence():
  ds = dominoes.load('train', seed=1, spurious_agreement=0.75, num_train=1000)
  assert np.mean(ds['label'] == ds['spurious']) == pytest.approx(0.75, abs=1e-9)
  # OOD ignores spurious_agreement: the attribute is independent of the label (2x2 table flat).
  ood = dominoes.load('test_ood', seed=1, spurious_agreement=0.75, num_test=1000)
  table = np.histogram2d(ood['label'], ood['spurious'], bins=2)[0]
  np.testing.assert_array_equal(table, np.full((2, 2), 250))


def test_deterministic_from_seed_without_cache():
  first = dominoes.load('train', seed=5, num_train=64)
  dominoes.clear_cache()
  second = dominoes.load('train', seed=5, num_train=64)
  assert first is not second  # really rebuilt, not the cached object
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])


def test_cached_and_read_only():
  a = dominoes.load('val_id', seed=2, num_val=32)
  assert dominoes.load('val_id', seed=2, num_val=32) is a
  with pytest.raises(ValueError):
    a['image'][0, 0, 0, 0] = 1


def test_different_seeds_and_splits_differ():
  a = dominoes.load('train', seed=0, num_train=64)
  b = dominoes.load('train', seed=1, num_train=64)
  assert not np.array_equal(a['image'], b['image'])
  assert not np.array_equal(a['label'], b['label'])
  val_id = dominoes.load('val_id', seed=0, num_val=64)
  test_id = dominoes.load('test_id', seed=0, num_test=64)
  assert not np.array_equal(val_id['image'], test_id['image'])


def _upscaled_digit(image):
  """Inverts the 2x nearest upscaling of the top half: [16, 16, 3] uint8 -> [8, 8] uint8."""
  return image[:16:2, ::2, 0]


def test_top_half_is_the_spurious_digit(small_splits):
  src = dominoes.sources()
  ds = small_splits['test_ood']
  top = ds['image'][:, :16]
  # Nearest upscaling: 2x2 blocks constant, three equal channels.
  np.testing.assert_array_equal(top[:, ::2, ::2], top[:, 1::2, 1::2])
  np.testing.assert_array_equal(top[..., 0], top[..., 2])
  for value in (0, 1):
    pool = np.round(src['digits']['test'][value] * 255).astype(np.uint8)
    pool = {p.tobytes() for p in pool}
    for image in ds['image'][ds['spurious'] == value]:
      assert _upscaled_digit(image).tobytes() in pool


def test_source_pools_do_not_leak():
  src = dominoes.sources()
  # Digits: train / val / test pools hold disjoint images (compared by content).
  for value in (0, 1):
    pools = [{p.tobytes() for p in src['digits'][pool][value]} for pool in ('train', 'val', 'test')]
    assert not pools[0] & pools[1] and not pools[0] & pools[2] and not pools[1] & pools[2]
    assert sum(len(p) for p in pools) >= 170  # ~178 digits of each class, nearly all distinct
  # Tiles: disjoint, and each pool has tiles of both photos.
  tiles = {pool: {tuple(t) for t in src['tiles'][pool]} for pool in ('train', 'val', 'test')}
  assert not tiles['train'] & tiles['val'] and not tiles['train'] & tiles['test']
  assert not tiles['val'] & tiles['test']
  for pool in tiles:
    assert {t[0] for t in tiles[pool]} == {0, 1}


@pytest.mark.parametrize('pool', ['val', 'test'])
def test_crops_read_only_their_pool_tiles(pool):
  # A probe "photo" that is 1 inside train tiles and 0 elsewhere: crops of a held-out pool,
  # at every crop scale including upsampling, must read only zeros.
  src = dominoes.sources()
  probe = np.zeros(src['photos'].shape[:3] + (1,), np.float32)
  oy, ox, t = *src['origin'], dominoes.TILE
  for photo, r, c in src['tiles']['train']:
    probe[photo, oy + r * t:oy + (r + 1) * t, ox + c * t:ox + (c + 1) * t] = 1.0
  label = np.arange(4000) % 2
  opts = {**dominoes.DEFAULT_OPTIONS, 'min_crop': 2, 'max_crop': t}
  rng = np.random.default_rng(0)
  held_out = dominoes.crops(label, probe, src['tiles'][pool], src['origin'], opts, rng)
  assert held_out.max() == 0.0
  train = dominoes.crops(label, probe, src['tiles']['train'], src['origin'], opts, rng)
  assert train.min() == 1.0  # the probe is right: train crops read only train tiles


def test_bilinear_matches_pointwise_reference():
  rng = np.random.default_rng(0)
  photos = rng.random((2, 9, 11, 3)).astype(np.float32)
  photo = np.array([1, 0])
  ys = np.array([[0.0, 2.5, 7.25, 8.0], [3.0, 3.9, 1.1, 5.5]])
  xs = np.array([[0.0, 10.0, 4.75], [9.5, 2.2, 6.0]])
  out = tiles.bilinear(photos, photo, ys, xs)

  def reference(p, y, x):
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    fy, fx = y - y0, x - x0
    y1, x1 = min(y0 + 1, 8), min(x0 + 1, 10)
    return ((1 - fy) * ((1 - fx) * photos[p, y0, x0] + fx * photos[p, y0, x1])
            + fy * ((1 - fx) * photos[p, y1, x0] + fx * photos[p, y1, x1]))

  for i in range(2):
    for a in range(4):
      for b in range(3):
        np.testing.assert_allclose(out[i, a, b], reference(photo[i], ys[i, a], xs[i, b]),
                                   rtol=1e-5, atol=1e-6)


def test_robust_half_carries_the_label_and_top_half_the_attribute():
  # Cheap probes (no deep training): a nearest-centroid classifier fitted on the train digits
  # reads the spurious attribute from the top half perfectly; a texture statistic of the photo
  # half (mean absolute horizontal gradient, higher for the sharp china photo than for the
  # blurred flower background) beats chance on the label and ignores the attribute.
  train = dominoes.load('train', seed=0, num_train=1000)
  ood = dominoes.load('test_ood', seed=0, num_test=1000, robust_noise=0.0)

  def digit(ds):
    return ds['image'][:, :16:2, ::2, 0].reshape(len(ds['image']), -1).astype(np.float32)

  centroids = np.stack([digit(train)[train['spurious'] == v].mean(0) for v in (0, 1)])
  distances = ((digit(ood)[:, None] - centroids[None]) ** 2).sum(-1)
  assert np.mean(distances.argmin(1) == ood['spurious']) > 0.98
  bottom = ood['image'][:, 16:, :, 0].astype(np.float32) / 255.0
  grad = np.abs(np.diff(bottom, axis=2)).mean(axis=(1, 2))
  predicted_china = grad > np.median(grad)
  assert np.mean(predicted_china == (ood['label'] == 0)) > 0.58
  assert abs(np.mean(predicted_china == (ood['spurious'] == 0)) - 0.5) < 0.06


def test_robust_options_change_only_the_bottom_half():
  base = dominoes.load('test_id', seed=0, num_test=32)
  for options in (dict(robust_saturation=1.0), dict(robust_noise=0.0), dict(color_jitter=0.0),
                  dict(min_crop=8, max_crop=8)):
    other = dominoes.load('test_id', seed=0, num_test=32, **options)
    np.testing.assert_array_equal(other['image'][:, :16], base['image'][:, :16])
    np.testing.assert_array_equal(other['label'], base['label'])
    assert not np.array_equal(other['image'][:, 16:], base['image'][:, 16:]), options


def test_saturation_zero_without_jitter_is_gray():
  gray = dominoes.load('test_id', seed=0, num_test=32, robust_saturation=0.0,
                       color_jitter=0.0)['image'][:, 16:]
  assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0],
                                                                       gray[..., 2])
  color = dominoes.load('test_id', seed=0, num_test=32, robust_saturation=1.0,
                        color_jitter=0.0)['image'][:, 16:]
  assert not np.array_equal(color[..., 0], color[..., 1])


@pytest.mark.parametrize('options, message', [
    (dict(spurious_agreemnt=0.9), 'valid options are'),
    (dict(spurious_agreement=1.5), 'spurious_agreement'),
    (dict(spurious_agreement='0.9'), 'spurious_agreement'),
    (dict(num_train=1), 'num_train'),
    (dict(num_val=10.0), 'num_val'),
    (dict(robust_noise=-0.1), 'robust_noise'),
    (dict(robust_saturation=1.1), 'robust_saturation'),
    (dict(robust_saturation=True), 'robust_saturation'),
    (dict(color_jitter=-0.01), 'color_jitter'),
    (dict(min_crop=20, max_crop=10), 'min_crop'),
    (dict(max_crop=dominoes.TILE + 1), 'max_crop'),
])
def test_bad_options_fail_fast(options, message):
  with pytest.raises(ValueError, match=message):
    dominoes.load('train', **options)


def test_unknown_option_lists_valid_ones():
  with pytest.raises(ValueError) as err:
    dominoes.load('train', foo=1)
  for name in dominoes.DEFAULT_OPTIONS:
    assert name in str(err.value)


def test_bad_split_and_seed():
  with pytest.raises(ValueError, match='valid splits'):
    dominoes.load('validation')
  with pytest.raises(ValueError, match='seed'):
    dominoes.load('train', seed=-1)
  with pytest.raises(ValueError, match='seed'):
    dominoes.load('train', seed=1.5)


def test_embedded_normalization_is_an_option_not_passed_to_the_generator():
  # mean / std say how the uint8 images are normalized; the generator never sees them.
  half = data.open({'name': 'dominoes', 'num_train': 40, 'num_val': 8, 'num_test': 8})
  unit = data.open({'name': 'dominoes', 'num_train': 40, 'num_val': 8, 'num_test': 8,
                    'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0)})
  pixels = np.array([0, 255], np.uint8).reshape(1, 1, 2, 1).repeat(3, axis=-1)
  np.testing.assert_allclose(np.asarray(half.normalization(pixels)).ravel()[::3], [-1.0, 1.0])
  np.testing.assert_allclose(np.asarray(unit.normalization(pixels)).ravel()[::3], [0.0, 1.0])
