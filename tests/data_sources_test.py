"""Fine-tuning, rotation, corruption and bring-your-own datasets on generated data.

TFDS datasets are read through `tfds.testing.mock_data` (random examples served by the
mocked `as_data_source`, i.e. the same random-access path as real array_record files);
CIFAR-100-C, npz, image folders and Imagewoof use tiny files in their real layouts.
"""

import io
import os

import numpy as np
import pytest
from PIL import Image

from vitreg_jax import data
from vitreg_jax.data import corrupted, device_normalization, imagenet, prepare, preprocess, rotation

import testutil  # pylint: disable=g-bad-import-order


@pytest.fixture
def mock_tfds():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    yield


def first(config, **kw):
  return next(data.open(config).train_iterator(global_batch_size=2, seed=0, process_index=0,
                                               process_count=1, **kw))


def eval_all(config, split, batch=4):
  batches = list(data.open(config).eval_iterator(split, global_batch_size=batch,
                                                 process_index=0, process_count=1))
  mask = np.concatenate([b['mask'] for b in batches]) == 1
  return {k: np.concatenate([b[k] for b in batches])[mask] for k in batches[0]}


@pytest.mark.parametrize('name,size,classes', [
    ('cifar10', 32, 10), ('cifar100', 32, 100), ('oxford_flowers102', 24, 102),
    ('imagenette', 24, 10)])
def test_finetune_sets(mock_tfds, name, size, classes):
  config = {'name': name, 'image_size': size, 'num_threads': 1}
  info = data.open(config).info
  assert info.num_classes == classes and info.image_shape == (size, size, 3)
  b = first(config)
  assert b['image'].shape == (2, size, size, 3) and b['label'].max() < classes
  ev = eval_all(config, info.default_eval_splits[0])
  assert len(ev['label']) == 6 and ev['image'].shape[1:] == (size, size, 3)


def test_unknown_variant_and_unprepared_message(tmp_path):
  with pytest.raises(ValueError, match="valid: .*'320px-v2'"):
    data.open({'name': 'imagenette', 'variant': 'huge', 'data_dir': str(tmp_path)})
  with pytest.raises(data.DatasetNotPreparedError,
                     match=r'(?s)not prepared.*python -m vitreg_jax.data.prepare cifar10'):
    data.open({'name': 'cifar10', 'data_dir': str(tmp_path)})


def test_imagenet_rotation(mock_tfds):
  config = {'name': 'imagenet_rotation', 'image_size': 16, 'num_threads': 1}
  info = data.open(config).info
  assert info.num_classes == 4 and info.attributes == ('object_label',)
  ev = eval_all(config, 'validation', batch=8)
  # Every image appears once per rotation: 6 images x 4 rotations, labels 0..3 each 6 times.
  assert len(ev['label']) == 24 and (np.bincount(ev['label']) == 6).all()
  for i in range(6):
    group = ev['image'][4 * i:4 * i + 4]
    np.testing.assert_array_equal(ev['label'][4 * i:4 * i + 4], [0, 1, 2, 3])
    for k in range(4):
      np.testing.assert_array_equal(group[k], np.rot90(group[0], k))
  labels = np.concatenate([first(config, start_step=s)['label'] for s in range(8)])
  assert len(set(labels)) > 1 and labels.max() < 4  # drawn per example on train


def test_cifar100_corrupted_reads_npy_severity_blocks(mock_tfds, tmp_path):
  testutil.write_cifar100_corrupted(tmp_path / 'CIFAR-100-C')
  config = {'name': 'cifar100_corrupted', 'manual_dir': str(tmp_path),
            'corruptions': ('fog', 'snow'), 'num_threads': 1,
            'mean': (0, 0, 0), 'std': (1, 1, 1)}
  info = data.open(config).info
  assert 'fog_3' in info.splits and 'train' in info.splits
  assert info.default_eval_splits[0] == 'test' and len(info.default_eval_splits) == 11
  for severity in (1, 5):
    ev = eval_all(config, f'fog_{severity}')
    assert len(ev['label']) == 3
    np.testing.assert_array_equal(ev['image'], 40 * severity)
    np.testing.assert_array_equal(ev['label'], np.arange(3 * (severity - 1), 3 * severity))
  assert first(config)['image'].shape == (2, 32, 32, 3)   # clean train from TFDS
  with pytest.raises(ValueError, match='Unknown corruption'):
    data.open(dict(config, corruptions=('rain',)))
  with pytest.raises(ValueError, match=r"valid splits: .*'fog_5'"):
    data.open(config).eval_iterator('fog_6', global_batch_size=2, process_index=0,
                                    process_count=1)


def test_cifar100_corrupted_missing_and_truncated_files(mock_tfds, tmp_path):
  config = {'name': 'cifar100_corrupted', 'manual_dir': str(tmp_path), 'corruptions': ('fog',)}
  # get_info opens every eval split, so missing files fail at start.
  with pytest.raises(data.DatasetNotPreparedError, match=r'CIFAR-100-C/fog\.npy is missing'):
    data.open(config)
  spec, cfg = data.get_spec(config)
  with pytest.raises(data.DatasetNotPreparedError, match='labels.npy'):
    spec.check_files(cfg)
  testutil.write_cifar100_corrupted(tmp_path / 'CIFAR-100-C', corruptions=('fog',))
  spec.check_files(cfg)
  path = tmp_path / 'CIFAR-100-C' / 'fog.npy'
  path.write_bytes(path.read_bytes()[:5000])
  with pytest.raises(data.CorruptDataError, match='fog.npy'):
    spec.check_files(cfg)


def test_cifar10_corrupted_splits(mock_tfds):
  config = {'name': 'cifar10_corrupted', 'corruptions': ('frosted_glass_blur',),
            'num_threads': 1}
  info = data.open(config).info
  assert info.splits == ('train', 'test') + tuple(f'frosted_glass_blur_{s}' for s in range(1, 6))
  assert len(eval_all(config, 'frosted_glass_blur_2')['label']) == 6
  assert set(corrupted.BENCHMARK_CORRUPTIONS_10) < set(corrupted.CIFAR10_C)
  assert len(corrupted.BENCHMARK_CORRUPTIONS_100) == 15


def _png(value, size=(20, 12)):
  buf = io.BytesIO()
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def test_image_folder(tmp_path):
  for split, n in (('train', 3), ('test', 2)):
    for c, value in (('cat', 10), ('dog', 200)):
      os.makedirs(tmp_path / split / c)
      for i in range(n):
        (tmp_path / split / c / f'{i}.png').write_bytes(_png(value))
  config = {'name': 'image_folder', 'path': str(tmp_path), 'image_size': 8, 'num_threads': 1,
            'mean': (0, 0, 0), 'std': (1, 1, 1)}
  info = data.open(config).info
  assert info.num_classes == 2 and info.splits == ('test', 'train')
  assert info.num_examples == {'test': 4, 'train': 6}
  ev = eval_all(config, 'test')
  np.testing.assert_array_equal(ev['image'][:, 0, 0, 0], np.where(ev['label'] == 1, 200, 10))
  assert first(config)['image'].shape == (2, 8, 8, 3)
  (tmp_path / 'test' / 'dog' / '1.png').write_bytes(b'\x89PNG broken')
  with pytest.raises(data.CorruptDataError, match=r'test/dog/1\.png'):
    eval_all(config, 'test')
  with pytest.raises(data.DatasetNotPreparedError, match='<split>/<class>'):
    data.open(dict(config, path=str(tmp_path / 'nope')))


def test_imagewoof_folder(tmp_path):
  root = tmp_path / 'imagewoof2-320'
  for split in ('train', 'val'):
    for k in range(10):
      os.makedirs(root / split / f'n0208{k}')
      (root / split / f'n0208{k}' / 'a.JPEG').write_bytes(_png(k * 20))
  config = {'name': 'imagewoof', 'manual_dir': str(tmp_path), 'image_size': 8,
            'num_threads': 1}
  info = data.open(config).info
  assert info.num_examples == {'train': 10, 'validation': 10} and info.num_classes == 10
  assert sorted(eval_all(config, 'validation')['label']) == list(range(10))
  with pytest.raises(data.DatasetNotPreparedError, match='imagewoof2-160.tgz'):
    data.open(dict(config, variant='160'))


def test_npz_layout_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (('train', 6), ('test', 5)):
    np.savez(tmp_path / f'd_{split}.npz', images=rng.integers(0, 256, (n, 8, 8, 1), np.uint8),
             labels=np.arange(n) % 3, spurious=(np.arange(n) + 1) % 2)
  config = {'name': 'npz', 'path': str(tmp_path / 'd_{split}.npz'), 'num_threads': 1}
  info = data.open(config).info
  assert info.num_classes == 3 and info.image_shape == (8, 8, 3)
  assert info.attributes == ('spurious', 'group') and info.default_eval_splits == ('test',)
  ev = eval_all(config, 'test')
  np.testing.assert_array_equal(ev['spurious'], (np.arange(5) + 1) % 2)
  assert ev['image'].shape == (5, 8, 8, 3)
  (tmp_path / 'bad.npz').write_bytes(b'PK\x03\x04 not a zip')
  with pytest.raises(data.CorruptDataError, match='bad.npz'):
    data.open({'name': 'npz', 'path': str(tmp_path / 'bad.npz')})
  np.savez(tmp_path / 'float.npz', images=np.zeros((2, 4, 4, 3), np.float32), labels=[0, 1])
  with pytest.raises(ValueError, match='uint8'):
    data.open({'name': 'npz', 'path': str(tmp_path / 'float.npz')})
  with pytest.raises(data.DatasetNotPreparedError, match='numpy.savez'):
    data.open({'name': 'npz', 'path': str(tmp_path / 'missing.npz')})


def test_prepare_option_parsing_and_rotation_transform():
  assert prepare.parse_options(['agreement=0.8', 'seed=2', 'variant=320px-v2']) == {
      'agreement': 0.8, 'seed': 2, 'variant': '320px-v2'}
  with pytest.raises(ValueError, match='key=value'):
    prepare.parse_options(['oops'])
  t = rotation.RotationTransform(preprocess.ImageTransform(
      size=4, train=False, crop_fraction=1.0, mean=(0, 0, 0), std=(1, 1, 1)))
  img = np.arange(16 * 3, dtype=np.uint8).reshape(4, 4, 3)
  out = t({'image': img, 'label': 7, 'rotation': 1})
  np.testing.assert_array_equal(out['image'], np.rot90(img, 1))
  assert out['image'].dtype == np.uint8
  assert device_normalization.of_transform(t) == device_normalization.Normalization(
      (0, 0, 0), (1, 1, 1))
  assert out['label'] == 1 and out['object_label'] == 7


def test_prepare_checks_manual_files_first(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError, match='ILSVRC2012_img_val.tar'):
    prepare.prepare('imagenet_rotation', data_dir=str(tmp_path), manual_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError, match='metadata.csv not found'):
    prepare.prepare('waterbirds', data_dir=str(tmp_path), manual_dir=str(tmp_path))
  with pytest.raises(ValueError, match='valid names'):
    prepare.prepare('imagenet')
