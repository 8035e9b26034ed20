"""The embedded ARViT datasets (data/embedded.py, data/embedded_rotation.py): shapes, splits,
determinism, the rotation task, and no pixel of a downstream test tile in pretraining or
downstream training. Small sizes, no training."""

import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax.data import embedded
from vitreg_jax.data import embedded_objects
from vitreg_jax.data import embedded_rotation
from vitreg_jax.data import rotation
from vitreg_jax.data import tiles

SMALL = dict(num_train=200, num_val=40, num_test=60)


def test_downstream_splits_shapes_and_balance():
  for split, n in (("train", 200), ("val", 40), ("test", 60)):
    ds = embedded.load(split, seed=0, **SMALL)
    assert ds["image"].shape == (n, 32, 32, 3) and ds["image"].dtype == np.uint8
    assert ds["label"].dtype == np.int32 and set(ds["label"]) <= set(range(10))
    np.testing.assert_array_equal(np.bincount(ds["label"], minlength=10), n // 10)
    # Gray (three equal channels), and the jitter leaves real contrast in most crops.
    np.testing.assert_array_equal(ds["image"][..., 0], ds["image"][..., 2])
    assert np.median(ds["image"][..., 0].reshape(n, -1).std(-1)) > 10
    assert not ds["image"].flags.writeable
  info = data.open(dict(name="embedded")).info
  assert (info.num_classes, info.image_shape, info.splits) == (10, (32, 32, 3),
                                                               ("train", "val", "test"))
  assert info.default_eval_splits == ("val", "test")


def test_deterministic_in_seed_and_options():
  a = embedded.load("test", seed=1, **SMALL)
  b = embedded.load("test", seed=1, **{**SMALL, "noise": 0.02})
  c = embedded.load("test", seed=2, **SMALL)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])


def test_tile_pools_are_disjoint_and_cover_each_photo_once():
  src = embedded.sources()
  seen = {}
  for pool, rows in src["tiles"].items():
    for row in map(tuple, rows):
      assert row not in seen, (row, pool, seen.get(row))
      seen[row] = pool
  pools = {pool: set(rows[:, 0]) for pool, rows in src["tiles"].items()}
  classes = set(range(embedded.NUM_CLASSES))
  for pool in ("train", "val", "test"):
    assert pools[pool] == classes  # downstream pools: only, and every, class photo
  assert pools["pretrain"] == set(range(len(embedded.SOURCES)))


@pytest.mark.parametrize("pool", ["pretrain", "pretrain_val", "train", "val"])
def test_no_pixel_of_a_test_tile_outside_the_test_pool(pool):
  # A probe image that is 1 on test tiles and 0 elsewhere: crops of every other pool, at every
  # crop scale, read only zeros, while test crops read only ones (the probe is right).
  src = embedded.sources()
  probe = np.zeros_like(src["photos"])
  for photo, top, left in src["tiles"]["test"]:
    probe[photo, top:top + embedded.TILE, left:left + embedded.TILE] = 1.0
  opts = embedded.check_options(dict(min_crop=2, max_crop=embedded.TILE, noise=0.0),
                                embedded.DEFAULT_OPTIONS, "embedded")
  rng = np.random.default_rng(0)

  def raw(p):  # the geometry of embedded.crops, before photometric normalization
    rows = src["tiles"][p]
    index = rng.integers(0, len(rows), 3000)
    photo, top, left = rows[index].T
    return tiles.sample_crops(probe, photo, top, left, embedded.TILE, embedded.SIZE,
                              opts["min_crop"], opts["max_crop"], rng)

  assert raw(pool).max() == 0.0
  assert raw("test").min() == 1.0


def test_rotation_dataset_rotates_and_keeps_the_photo():
  cfg = dict(name="embedded_rotation", num_train=64, num_val=8)
  ds = data.open(cfg)
  info = ds.info
  assert info.num_classes == 4 and info.splits == ("train", "val")
  assert info.attributes == ("object_label",)
  assert info.attribute_classes == {"object_label": len(embedded.SOURCES) + 2}
  raw = embedded_rotation.load("val", num_train=64, num_val=8)
  batch = next(iter(ds.eval_iterator("val", global_batch_size=32)))
  assert batch["image"].shape == (32, 32, 32, 3) and batch["mask"].sum() == 32
  np.testing.assert_array_equal(batch["label"], np.tile(np.arange(4), 8))
  np.testing.assert_array_equal(batch["object_label"], np.repeat(raw["label"], 4))
  for i in range(8):
    for k in range(4):
      np.testing.assert_array_equal(batch["image"][4 * i + k], np.rot90(raw["image"][i], k))
  train = next(ds.train_iterator(global_batch_size=16, seed=0))
  assert set(train["label"]) <= set(range(4)) and len(set(train["label"])) > 1


def test_rotation_crops_come_from_pretraining_tiles_only():
  ds = embedded_rotation.load("train", seed=0, num_train=300)
  assert ds["image"].shape == (300, 32, 32, 3)
  assert set(ds["label"]) <= set(range(len(embedded.SOURCES)))
  assert embedded_rotation.POOL == {"train": "pretrain", "val": "pretrain_val"}
  assert isinstance(data.DATASETS["embedded_rotation"], rotation.EmbeddedRotationDataset)


@pytest.mark.parametrize("load,kwargs,field", [
    (embedded.load, dict(split="train", bogus=1), "bogus"),
    (embedded.load, dict(split="pretrain"), "split"),
    (embedded.load, dict(split="train", max_crop=embedded.TILE + 1), "max_crop"),
    (embedded.load, dict(split="train", num_train=0), "num_train"),
    (embedded.load, dict(split="train", seed=-1), "seed"),
    (embedded_rotation.load, dict(split="test"), "split"),
    (embedded_rotation.load, dict(split="val", faces=1.5), "faces"),
    (embedded_rotation.load, dict(split="val", faces=0.6, digits=0.6), "sum to at most 1"),
])
def test_mistakes_are_user_errors(load, kwargs, field):
  with pytest.raises(errors.UserError, match=field):
    load(**kwargs)


@pytest.mark.parametrize("pool", ["pretrain", "pretrain_val"])
def test_downscaled_pretraining_windows_lie_in_their_pool(pool):
  src = embedded.sources()
  members = {tuple(r) for r in src["tiles"][pool].tolist()}
  test_tiles = {tuple(r) for r in src["tiles"]["test"].tolist()}
  images, windows = embedded.super_tiles(pool, 2)
  assert len(windows) > 0 and images.shape == (len(windows), embedded.TILE, embedded.TILE, 1)
  t = embedded.TILE
  for (photo, top, left), image in zip(windows.tolist(), images):
    cells = {(photo, top + i * t, left + j * t) for i in range(2) for j in range(2)}
    assert cells <= members and not cells & test_tiles
    # The window's 128 px, averaged over 2 x 2 pixel boxes (a slow reference).
    region = src["photos"][photo, top:top + 2 * t, left:left + 2 * t, 0]
    slow = np.array([[region[2 * y:2 * y + 2, 2 * x:2 * x + 2].mean() for x in range(t)]
                     for y in range(t)])
    np.testing.assert_allclose(image[..., 0], slow, atol=1e-6)
  # downscale 1 is the pool's tiles themselves.
  np.testing.assert_array_equal(embedded.super_tiles(pool, 1)[1], src["tiles"][pool])


def test_partition_keeps_pretraining_blocks_whole():
  # Whole BLOCK x BLOCK blocks go to pretraining, so downscale 2 finds windows in every
  # class photo (the rotation task sees all of them at the larger scale).
  _, windows = embedded.super_tiles("pretrain", 2)
  assert set(windows[:, 0]) == set(range(len(embedded.SOURCES)))
  # The downstream tiles are still split one by one: each class photo keeps 10-14 test
  # tiles (about 20% of its 54-64), the other photos none.
  test = np.bincount(embedded.sources()["tiles"]["test"][:, 0], minlength=len(embedded.SOURCES))
  assert all(10 <= n <= 14 for n in test[:embedded.NUM_CLASSES])
  assert not test[embedded.NUM_CLASSES:].any()


def test_downscaled_rotation_crops():
  ds = embedded_rotation.load("val", seed=0, num_val=50, downscale=2)
  assert ds["image"].shape == (50, 32, 32, 3)
  assert not np.array_equal(ds["image"], embedded_rotation.load("val", seed=0, num_val=50)["image"])
  with pytest.raises(errors.UserError, match="downscale"):
    embedded_rotation.load("val", downscale=3)


@pytest.mark.parametrize("kind,size", [("faces", 100), ("digits", 1797)])
def test_object_pools_are_disjoint_and_cover_the_collection(kind, size):
  train = embedded_objects.indices(kind, "pretrain")
  val = embedded_objects.indices(kind, "pretrain_val")
  assert not set(train) & set(val) and len(train) + len(val) == size
  assert len(val) == round(0.2 * size)
  images = embedded_objects.images(kind, "pretrain_val")
  assert images.shape == (len(val), embedded.TILE, embedded.TILE, 1)
  # Each tile is its source image resampled: the same image, upright (a slow reference: the
  # tile's mean over the source's footprint equals the source's mean within resampling error).
  raw = embedded_objects._raw(kind)[val]  # pylint: disable=protected-access
  np.testing.assert_allclose(images[..., 0].mean((1, 2)), raw.mean((1, 2)), atol=0.03)
  top = images[:, :embedded.TILE // 2, :, 0].mean((1, 2)) - images[:, embedded.TILE // 2:, :, 0].mean((1, 2))
  raw_top = raw[:, :raw.shape[1] // 2].mean((1, 2)) - raw[:, raw.shape[1] // 2:].mean((1, 2))
  np.testing.assert_allclose(top, raw_top, atol=0.05)


def test_rotation_mix_of_photos_faces_and_digits():
  n = 90
  ds = embedded_rotation.load("val", seed=0, num_val=n, faces=1 / 3, digits=1 / 3)
  counts = np.bincount(ds["label"], minlength=embedded_rotation.NUM_OBJECTS)
  faces, digits = len(embedded.SOURCES), len(embedded.SOURCES) + 1
  assert counts[faces] == 30 and counts[digits] == 30 and counts[:faces].sum() == 30
  # Interleaved, not in blocks: the first third already holds every kind.
  first = set(ds["label"][:30])
  assert faces in first and digits in first and first & set(range(faces))
  # Rounding never asks for more crops than n (3 x 0.5 rounds to 2 for each kind).
  tiny = embedded_rotation.load("val", seed=0, num_val=3, faces=0.5, digits=0.5)
  assert len(tiny["label"]) == 3 and (tiny["label"] >= faces).all()
  # Object crops are never downstream data: the downstream sources are the photos alone.
  assert embedded_rotation.load("val", seed=0, num_val=n)["label"].max() < faces
  # Digits are bright strokes on a dark border: their crops' border is darker than the centre.
  digit = ds["image"][ds["label"] == digits][..., 0].astype(float)
  border = np.concatenate([digit[:, 0], digit[:, -1], digit[:, :, 0], digit[:, :, -1]], 1)
  assert (border.mean(1) < digit[:, 12:20, 12:20].mean((1, 2))).mean() > 0.8
