"""MNIST-CIFAR: construction, agreement rates, splits, the TFDS build and the pipeline on it.

Fake MNIST / CIFAR pools encode their identity in the pixels (a digit image is filled with
100 + its index, a CIFAR image with its index in the top-left pixel), so the test can check
which digit and which photo every example holds.
"""

import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax.data import mnist_cifar


def _pool(labels, shape):
  labels = np.asarray(labels)
  images = np.zeros((len(labels),) + shape, np.uint8)
  images[:, 0, 0, 0] = np.arange(len(labels)) % 256  # identity of the example
  images[:, 1, 1, 0] = labels                          # its class
  return images, labels


def fake_inputs(n_mnist_train=300, n_mnist_test=200, n_cifar_train=200, n_cifar_test=100):
  # MNIST digit d appears about equally; CIFAR classes 0..9 equally.
  mnist = {'train': _pool(np.arange(n_mnist_train) % 10, (28, 28, 1)),
           'test': _pool(np.arange(n_mnist_test) % 10, (28, 28, 1))}
  cifar = {'train': _pool(np.arange(n_cifar_train) % 10, (32, 32, 3)),
           'test': _pool(np.arange(n_cifar_test) % 10, (32, 32, 3))}
  return mnist, cifar


def test_stack_images_layout():
  digit = np.full((1, 28, 28), 7, np.uint8)
  photo = np.full((1, 32, 32, 3), 9, np.uint8)
  img = mnist_cifar.stack_images(digit, photo)
  assert img.shape == (1, 64, 32, 3)
  assert (img[0, :2] == 0).all() and (img[0, 30:32] == 0).all()   # 2-px padding
  assert (img[0, 2:30, 2:30] == 7).all() and (img[0, 32:] == 9).all()


def test_construct_agreement_groups_and_content():
  mnist, cifar = fake_inputs()
  splits = mnist_cifar.construct(mnist, cifar, agreement=0.9, seed=0, val_ratio=0.5)
  assert set(splits) == set(mnist_cifar.SPLITS)
  tr = splits['train']
  # n = min(#automobile=20, #truck=20, #zeros=30, #ones=30) = 20 per class.
  assert len(tr['label']) == 40 and (np.bincount(tr['label']) == 20).all()
  for c in (0, 1):
    sel = tr['label'] == c
    assert np.sum(tr['spurious'][sel] == c) == 18          # round(0.9 * 20)
  np.testing.assert_array_equal(tr['group'], 2 * tr['label'] + tr['spurious'])
  # The bottom half is the right CIFAR image and class, the top half the right digit.
  cifar_imgs, cifar_labels = cifar['train']
  mnist_imgs, mnist_labels = mnist['train']
  np.testing.assert_array_equal(tr['image'][:, 32:], cifar_imgs[tr['photo_index']])
  np.testing.assert_array_equal(cifar_labels[tr['photo_index']],
                                np.asarray(mnist_cifar.CIFAR_CLASSES)[tr['label']])
  np.testing.assert_array_equal(mnist_labels[tr['digit_index']], tr['spurious'])
  np.testing.assert_array_equal(tr['image'][:, 2:30, 2:30, 1],
                                mnist_imgs[tr['digit_index'], :, :, 0])
  assert len(set(tr['photo_index'])) == 40 and len(set(tr['digit_index'])) == 40  # no reuse
  for split in ('val_ood', 'test_ood'):
    ex = splits[split]
    assert (np.bincount(ex['group'], minlength=4) == len(ex['label']) // 4).all()
  for split in ('val_id', 'test_id'):
    ex = splits[split]
    agree = np.mean(ex['spurious'] == ex['label'])
    assert abs(agree - 0.9) <= 0.1   # 5 per class: round(4.5) = 4 of 5 agree
  # The CIFAR test set is split per class into disjoint val and test halves, shared by domains.
  # (OOD truncates to an even n, so it may use a subset of the half.)
  val = set(splits['val_id']['photo_index'])
  assert set(splits['val_ood']['photo_index']) <= val
  assert not val & set(splits['test_id']['photo_index'])
  assert not val & set(splits['test_ood']['photo_index'])


def test_construct_large_rates_and_determinism():
  mnist, cifar = fake_inputs(4000, 2000, 2000, 1000)
  a = mnist_cifar.construct(mnist, cifar, agreement=0.9, seed=3)
  b = mnist_cifar.construct(mnist, cifar, agreement=0.9, seed=3)
  c = mnist_cifar.construct(mnist, cifar, agreement=0.9, seed=4)
  for s in mnist_cifar.SPLITS:
    np.testing.assert_array_equal(a[s]['image'], b[s]['image'])
  assert not np.array_equal(a['train']['image'], c['train']['image'])
  assert np.mean(a['train']['spurious'] == a['train']['label']) == pytest.approx(0.9)
  assert np.mean(a['test_id']['spurious'] == a['test_id']['label']) == pytest.approx(0.9)
  assert np.mean(a['test_ood']['spurious'] == a['test_ood']['label']) == pytest.approx(0.5)
  with pytest.raises(ValueError, match='agreement'):
    mnist_cifar.construct(mnist, cifar, agreement=1.5)
  with pytest.raises(ValueError, match='val_ratio'):
    mnist_cifar.construct(mnist, cifar, val_ratio=1.0)


def test_val_ratio_is_the_authors_20_80_split_by_default():
  mnist, cifar = fake_inputs(4000, 2000, 2000, 1000)
  test_per_class = np.bincount(cifar['test'][1])[list(mnist_cifar.CIFAR_CLASSES)]
  for ratio in (0.2, 0.5):
    kw = {} if ratio == 0.2 else {'val_ratio': ratio}
    s = mnist_cifar.construct(mnist, cifar, agreement=0.9, seed=0, **kw)
    val, test = set(s['val_id']['photo_index']), set(s['test_id']['photo_index'])
    assert not val & test and not val & set(s['test_ood']['photo_index'])
    # The val part holds round(ratio * n_c) CIFAR images of each class, the test part the rest.
    assert len(val) == sum(round(ratio * n) for n in test_per_class)
    assert len(test) == sum(n - round(ratio * n) for n in test_per_class)
  assert mnist_cifar.config_name(0.9, 0) == 'agree0.9_seed0_val0.2'
  assert mnist_cifar.config_name(0.9, 0, 0.5) == 'agree0.9_seed0'  # data prepared before


def test_tfds_build_and_pipeline(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  mnist, cifar = fake_inputs(60, 40, 40, 100)
  config = {'name': 'mnist_cifar', 'data_dir': str(tmp_path), 'num_threads': 1}
  with pytest.raises(data.DatasetNotPreparedError, match='vitreg_jax.data.prepare mnist_cifar'):
    data.open(config)
  monkeypatch.setattr(mnist_cifar, 'load_inputs', lambda *a, **k: (mnist, cifar))
  from vitreg_jax.data import prepare
  info = prepare.prepare('mnist_cifar', data_dir=str(tmp_path))
  assert (tmp_path / 'mnist_cifar' / 'agree0.9_seed0_val0.2' / '1.0.0').is_dir()
  assert info.image_shape == (64, 32, 3) and info.num_classes == 2
  assert info.num_examples['train'] == 8 and set(info.attributes) == {'spurious', 'group'}
  expected = mnist_cifar.construct(mnist, cifar, 0.9, 0, 0.2)
  batches = list(data.open(config).eval_iterator('test_ood', global_batch_size=4,
                                                 process_index=0, process_count=1))
  got = {k: np.concatenate([b[k] for b in batches])[
      np.concatenate([b['mask'] for b in batches]) == 1] for k in ('label', 'spurious', 'group')}
  # TFDS shuffles records on write: compare the multisets of (label, spurious) pairs.
  pairs = sorted(zip(got['label'], got['spurious']))
  assert pairs == sorted(zip(expected['test_ood']['label'], expected['test_ood']['spurious']))
  np.testing.assert_array_equal(got['group'], 2 * got['label'] + got['spurious'])
  b = next(data.open(config).train_iterator(global_batch_size=4, seed=0, process_index=0,
                                            process_count=1))
  assert b['image'].shape == (4, 64, 32, 3) and b['image'].dtype == np.uint8
  normalized = data.open(config).normalization.host(b['image'])
  assert -1.0 <= normalized.min() and normalized.max() <= 1.0


def test_load_inputs_reads_tfds_sources():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    mnist, cifar = mnist_cifar.load_inputs(download=False)
  assert mnist['train'][0].shape == (6, 28, 28, 1) and mnist['test'][1].shape == (6,)
  assert cifar['train'][0].shape == (6, 32, 32, 3) and cifar['train'][0].dtype == np.uint8
