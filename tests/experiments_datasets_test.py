"""The spurious-correlation datasets made outside the package (experiments/): a tiny textured
digits set has the promised shapes, splits, exact balance and disjoint source pools, and the
experiments' configs read it through the `npz` loader, evaluating the four held-out splits with
`head_eval` on."""

import importlib.util
import os
import types

import numpy as np
import pytest
from sklearn import datasets

from vitreg_jax import config_lib
from vitreg_jax import data

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
MAKER = os.path.join(ROOT, "textured_digits", "make_textured_digits.py")
CONFIGS = {"colored": os.path.join(ROOT, "colored_digits", "colored_digits_config.py"),
           "textured": os.path.join(ROOT, "textured_digits", "textured_digits_config.py")}
SIZES = {"train": 200, "val_id": 40, "val_ood": 40, "test_id": 40, "test_ood": 40}
HELD_OUT = ("val_id", "val_ood", "test_id", "test_ood")


@pytest.fixture(scope="module")
def maker():
  return config_lib.import_config(MAKER)


@pytest.fixture(scope="module")
def tiny(maker, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("textured"))
  maker.build(out, seed=0, agreement=0.9, sizes=SIZES)
  return out


def test_shapes_and_exact_balance(tiny):
  for split, n in SIZES.items():
    with np.load(os.path.join(tiny, f"{split}.npz")) as f:
      images, labels, spurious = f["images"], f["labels"], f["spurious"]
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == spurious.dtype == np.int32
    assert (images[..., 0] == images[..., 2]).all()  # gray: the texture is no colour cue
    agreement = 0.5 if split.endswith("ood") else 0.9
    for c in (0, 1):  # every class: n / 2 examples, round(p * n / 2) of them with its texture
      assert (labels == c).sum() == n // 2
      assert (spurious[labels == c] == c).sum() == round(agreement * n / 2)


def _partition(parts, universe):
  """True where the pools' index arrays are disjoint and cover `universe` exactly."""
  allidx = np.concatenate(parts).tolist()
  return len(allidx) == len(set(allidx)) and set(allidx) == set(np.asarray(universe).tolist())


def test_source_pools_are_disjoint(maker):
  digits, textures = maker.digit_pools(0), maker.texture_pools(0)
  target = datasets.load_digits().target
  for c, digit in enumerate(maker.DIGITS):
    idx = {p: digits[p]["index"][c] for p in maker.POOLS}
    assert _partition(list(idx.values()), np.flatnonzero(target == digit))
    assert len(idx["train"]) > 2 * len(idx["test"]) > 0
    tiles = [textures[p]["index"][c] for p in maker.POOLS]
    assert _partition(tiles, range(64))  # the 8x8 grid of 64x64 tiles of a 512x512 texture
  # No training digit image reappears in val / test (the pools cut sklearn's indices).
  train = {im.tobytes() for c in range(2) for im in digits["train"]["images"][c]}
  for pool in ("val", "test"):
    held = [im.tobytes() for c in range(2) for im in digits[pool]["images"][c]]
    assert not train.intersection(held)


def test_pool_tiles_are_the_image_tiles_they_name(maker, monkeypatch):
  # A probe texture whose 64x64 tile at grid (r, c) holds the value 8 r + c everywhere: each
  # pool tile must be exactly the tile its grid index names (no crop across tiles).
  probe = np.kron(np.arange(64, dtype=np.uint8).reshape(8, 8), np.ones((64, 64), np.uint8))
  monkeypatch.setattr(maker, "skdata", types.SimpleNamespace(brick=lambda: probe,
                                                             gravel=lambda: probe))
  textures = maker.texture_pools(0)
  for pool in maker.POOLS:
    for tiles, index in zip(textures[pool]["tiles"], textures[pool]["index"]):
      assert tiles.shape[1:] == (maker.TILE, maker.TILE)
      values = np.round(tiles * 255).astype(int)
      np.testing.assert_array_equal(values, np.broadcast_to(index[:, None, None], values.shape))
  crop = maker.background(np.random.default_rng(0), textures["train"]["tiles"][0], 0.1)
  assert crop.shape == (maker.SIZE, maker.SIZE)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_read_the_npz_with_groups_and_test_splits(name, tiny, monkeypatch):
  module = config_lib.import_config(CONFIGS[name])
  monkeypatch.setattr(module, "DATA", tiny)  # the configs' default data folder
  config = config_lib.with_defaults(module.get_config("steps=10"))
  assert tuple(config.data.eval_splits) == HELD_OUT and config.head_eval == "-1"
  ds = data.open(config.data)
  assert tuple(ds.eval_splits) == HELD_OUT == tuple(ds.held_out_splits)
  assert ds.info.attributes == ("spurious", "group") and ds.info.image_shape == (32, 32, 3)
  # Groups (label, texture): 2 * label + spurious, 90 / 10 per class in train.
  assert ds.group_counts().tolist() == [90, 10, 10, 90]



def test_estimator_error_measures_truth_spread_and_error():
  # experiments/estimator_error.py on one hand-made step: two candidates, 4 ID and 4 OOD images.
  spec = importlib.util.spec_from_file_location(
      "estimator_error", os.path.join(ROOT, "estimator_error.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  label = np.array([0, 1, 0, 1])
  data = {"val_id": {"label": label, "pred": np.array([[0, 1, 0, 1], [0, 1, 1, 1]]),
                     "confidence": np.full((2, 4), 0.9, np.float32)},
          "val_ood": {"label": label, "pred": np.array([[0, 0, 0, 0], [0, 1, 0, 1]]),
                      "confidence": np.full((2, 4), 0.7, np.float32)}}
  out = module.step_figures(data, "val_id", "val_ood")
  truth = np.array([0.5, 1.0])  # OOD accuracies of the two candidates
  assert out["spread"] == pytest.approx(np.std(truth))
  assert out["best_gap"] == pytest.approx(0.5)
  doc = np.array([1.0, 0.75]) - (0.9 - 0.7)  # DoC: ID acc - (ID conf - OOD conf)
  assert out["doc_mae"] == pytest.approx(np.mean(np.abs(doc - truth)))
  assert out["doc_rank_corr"] == pytest.approx(-1.0)  # DoC ranks them the wrong way round


def test_arvit_rotation_by_source_splits_accuracy_by_kind():
  # experiments/arvit_rotation_by_source.py on hand-made predictions of 8 crops.
  spec = importlib.util.spec_from_file_location(
      "arvit_rotation_by_source", os.path.join(ROOT, "arvit_rotation_by_source.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  photos = 16  # len(embedded.SOURCES); 16 = faces, 17 = digits
  source = np.array([0, 3, 15, 16, 16, 17, 17, 17])
  label = np.array([0, 1, 2, 3, 0, 1, 2, 3])
  pred = np.array([0, 0, 0, 3, 0, 1, 2, 0])  # photos 1/3, faces 2/2, digits 2/3
  out = module.by_source(pred, label, source)
  assert out["n_photos"] == 3 and out["n_faces"] == 2 and out["n_digits"] == 3
  np.testing.assert_allclose([out["all"], out["photos"], out["faces"], out["digits"]],
                             [5 / 8, 1 / 3, 1.0, 2 / 3])
  assert module.by_source(pred[:3], label[:3], source[:3])["faces"] is None
  assert photos == len(module.embedded.SOURCES)


def test_arvit_linear_probe_chooses_on_val_and_scores_test():
  # experiments/arvit_linear_probe.py's probe on hand-made features: informative features are
  # probed far above chance, pure noise near it; the penalty is one of the grid's.
  spec = importlib.util.spec_from_file_location(
      "arvit_linear_probe", os.path.join(ROOT, "arvit_linear_probe.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  rng = np.random.default_rng(0)
  labels = {s: rng.integers(0, 3, size=n) for s, n in zip(module.SPLITS, (300, 100, 200))}
  centres = rng.normal(size=(3, 20)) * 2.0
  informative = {s: centres[y] + rng.normal(size=(len(y), 20)) for s, y in labels.items()}
  noise = {s: rng.normal(size=(len(y), 20)) for s, y in labels.items()}
  good, bad = module.probe(informative, labels), module.probe(noise, labels)
  assert good["test"] > 0.9 and bad["test"] < 0.5
  assert good["alpha"] in module.ALPHA_GRID and 0.0 <= good["val"] <= 1.0
