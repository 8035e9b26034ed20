"""Waterbirds: TFDS build from a fake release folder (metadata.csv + JPEGs), groups, splits,
preprocessing, group metrics and error messages."""

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from vitreg_jax import data
from vitreg_jax import metrics
from vitreg_jax.data import device_normalization, preprocess, waterbirds

# (y, place, split): every group in train, val and test, with distinct counts per group.
ROWS = ([(0, 0, 0)] * 3 + [(0, 1, 0)] + [(1, 0, 0)] + [(1, 1, 0)] * 2 +
        [(0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1)] +
        [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2), (1, 1, 2)])


def _jpeg(value, size=(40, 30)):
  buf = io.BytesIO()
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


def make_release(root):
  folder = root / waterbirds.FOLDER
  rows = []
  for i, (y, place, split) in enumerate(ROWS):
    species = '001.Black_footed_Albatross' if y else '002.Laysan_Albatross'
    fname = f'{species}/bird_{i:04d}.jpg'
    os.makedirs(folder / species, exist_ok=True)
    # Pixel value encodes the group, so decoded images can be checked against labels.
    (folder / fname).write_bytes(_jpeg(40 + 50 * (2 * y + place)))
    rows.append({'img_id': i + 1, 'img_filename': fname, 'y': y, 'split': split,
                 'place': place, 'place_filename': f'/x/{i}.jpg'})
  with open(folder / 'metadata.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return folder


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  manual = tmp_path_factory.mktemp('manual')
  data_dir = tmp_path_factory.mktemp('tfds')
  make_release(manual)
  from vitreg_jax.data import prepare
  prepare.prepare('waterbirds', data_dir=str(data_dir), manual_dir=str(manual))
  return {'name': 'waterbirds', 'data_dir': str(data_dir), 'manual_dir': str(manual),
          'image_size': 16, 'num_threads': 1}


def test_info_splits_and_groups(prepared):
  info = data.open(prepared).info
  assert info.num_classes == 2 and info.image_shape == (16, 16, 3)
  assert info.splits == ('train', 'val', 'test') and info.attributes == ('place', 'group')
  assert info.num_examples['train'] == 7
  for split, sid in waterbirds.SPLIT_IDS.items():
    batches = list(data.open(prepared).eval_iterator(split, global_batch_size=4,
                                                     process_index=0, process_count=1))
    mask = np.concatenate([b['mask'] for b in batches]) == 1
    got = {k: np.concatenate([b[k] for b in batches])[mask] for k in ('label', 'place', 'group')}
    expected = sorted((y, p) for y, p, s in ROWS if s == sid)
    assert sorted(zip(got['label'], got['place'])) == expected
    np.testing.assert_array_equal(got['group'], 2 * got['label'] + got['place'])
    # Decoded pixels match the group the metadata gave (JPEG: approximately).
    images = np.concatenate([b['image'] for b in batches])[mask]
    assert images.dtype == np.uint8  # normalized on the device, with the ImageNet statistics
    assert data.open(prepared).normalization == device_normalization.Normalization(
        preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
    np.testing.assert_allclose(images[:, 8, 8, 0].astype(float), 40 + 50 * got['group'], atol=3)


def test_train_augmentation_and_group_metrics(prepared):
  it = data.open(prepared).train_iterator(global_batch_size=7, seed=0, process_index=0,
                                          process_count=1)
  b = next(it)
  assert b['image'].shape == (7, 16, 16, 3) and b['group'].dtype == np.int32
  assert sorted(b['group']) == sorted(2 * y + p for y, p, s in ROWS if s == 0)
  # Predict "landbird" always: group accuracies are 1 for landbird groups, 0 otherwise.
  m = metrics.group_metrics(np.zeros_like(b['label']), b['label'], b['group'], num_groups=4)
  assert m['group0_accuracy'] == 1 and m['group3_accuracy'] == 0
  assert m['worst_group_accuracy'] == 0 and m['mean_group_accuracy'] == 0.5


def test_eval_preprocessing_is_square_resize_then_center_crop():
  img = np.zeros((40, 80, 3), np.uint8)
  img[:, 40:] = 200   # right half bright
  t = waterbirds.WaterbirdsDataset().transform(
      {'image_size': 14, 'augment': True, 'crop_fraction': 0.875, 'crop_scale': (0.7, 1.0),
       'mean': (0, 0, 0), 'std': (1, 1, 1)}, 'test', train=False)
  out = t.image({'image': img, 'label': 0, 'place': 0, 'group': 0}, None)
  assert out.shape == (14, 14, 3)
  # Aspect is not preserved: the left and right halves each map to about 7 columns.
  assert out[:, :6, 0].max() == 0 and out[:, 8:, 0].min() == 200


def test_missing_and_corrupt_files_are_named(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError, match='metadata.csv not found'):
    waterbirds.find_root(str(tmp_path))
  folder = make_release(tmp_path)
  os.remove(folder / '002.Laysan_Albatross/bird_0000.jpg')
  with pytest.raises(data.DatasetNotPreparedError, match='bird_0000.jpg'):
    waterbirds.read_metadata(str(folder))
  truncated = folder / '002.Laysan_Albatross/bird_0001.jpg'
  truncated.write_bytes(truncated.read_bytes()[:200])
  with pytest.raises(data.CorruptDataError, match='bird_0001.jpg'):
    waterbirds.read_checked_image(str(truncated))
  with pytest.raises(data.DatasetNotPreparedError,
                     match=r'(?s)waterbird_complete95_forest2water2/metadata.csv.*'
                           r'vitreg_jax.data.prepare waterbirds'):
    data.open({'name': 'waterbirds', 'data_dir': str(tmp_path / 'empty'),
               'manual_dir': str(tmp_path / 'nothing')})
