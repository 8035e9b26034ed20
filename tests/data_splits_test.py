"""Split slicing (`train[:6%]`, `train[:5000]`, ...): TFDS's semantics, every dataset,
deterministic and resumable training on the slice."""

import sys
import types

import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax.data import custom, splits

import testutil  # pylint: disable=g-bad-import-order

N_TRAIN = testutil.FAKE_N_TRAIN


@pytest.fixture(autouse=True)
def fake_dataset(monkeypatch):
  monkeypatch.setitem(sys.modules, 'fake_embedded',
                      testutil.fake_embedded_module('fake_embedded'))
  monkeypatch.setitem(data.DATASETS, 'fake', custom.EmbeddedDataset('fake_embedded'))


def cfg(**kw):
  return {'name': 'fake', 'num_threads': 1, 'prefetch_batches': 1, **kw}


def take(it, k):
  return [next(it) for _ in range(k)]


SPECS = ['train', 'train[:6%]', 'train[:5]', 'train[10%:20%]', 'train[-10%:]', 'train[3:7]',
         'train[-5:]', 'train[:-3]', 'train[2:]', 'train[:33.3%]', 'train[12.5%:87.5%]',
         'train[-50%:-25%]', 'train[:100%]', 'train[0:1]']


@pytest.mark.parametrize('n', [1, 7, 20, 99, 50000])
def test_bounds_equal_tfds_read_instruction(n):
  from tensorflow_datasets.core import splits as tfds_splits  # Reference; imports no TF.
  info = {'train': types.SimpleNamespace(num_examples=n, shard_lengths=[n])}
  for spec in SPECS:
    try:
      (ref,) = tfds_splits.ReadInstruction.from_spec(spec).to_absolute(info)
      expected = (ref.from_ or 0, n if ref.to is None else ref.to)
    except (ValueError, AssertionError):
      expected = None
    if expected is not None and expected[1] <= expected[0]:
      expected = None  # TFDS would read nothing; we refuse an empty selection.
    if expected is None:
      with pytest.raises(ValueError):
        splits.parse(spec).bounds(n)
    else:
      assert splits.parse(spec).bounds(n) == expected, (spec, n)


def test_parse_errors_name_the_syntax():
  for bad, why in [('train[:6%]+test', 'concatenating'), ('train[:6%](pct1_dropremainder)',
                                                         'rounding'),
                   ('train[3]', 'from:to'), ('train[a:b]', 'boundary'),
                   ('train[:5%:2]', 'from:to'), ('train[1%:5]', 'mixing'),
                   ('train[:2.5]', 'integers'), ('train[]', 'from:to')]:
    with pytest.raises(ValueError, match=why) as e:
      splits.parse(bad)
    assert "'train[:6%]'" in str(e.value)  # the message shows the accepted forms.
  with pytest.raises(ValueError, match='beyond the 20 examples'):
    splits.parse('train[:30]').bounds(20)
  with pytest.raises(ValueError, match='selects no example'):
    splits.parse('train[10:5]').bounds(20)
  assert splits.base_name('train[:6%]') == 'train' and not splits.parse('test').sliced
  assert splits.main(['train[:6%]', '50000']) == 0


def test_train_slice_is_the_prefix_and_info_counts_it():
  info = data.open(cfg(train_split='train[:25%]')).info
  assert info.num_examples['train[:25%]'] == 5 and info.num_examples['train'] == N_TRAIN
  it = data.open(cfg(train_split='train[:25%]')).train_iterator(global_batch_size=2, seed=0,
                                                                process_index=0, process_count=1)
  uids = np.concatenate([b['uid'] for b in take(it, 10)])  # 4 epochs of the 5 examples.
  for epoch in uids.reshape(4, 5):
    assert sorted(epoch) == [0, 1, 2, 3, 4]
  assert not np.array_equal(uids[:5], uids[5:10])  # a fresh permutation per epoch.
  tail = data.open(cfg(train_split='train[-3:]')).train_iterator(global_batch_size=3, seed=0,
                                                                 process_index=0, process_count=1)
  assert sorted(next(tail)['uid']) == [17, 18, 19]


def test_slice_stream_is_deterministic_resumable_and_shards_over_processes():
  config = cfg(train_split='train[5:12]')

  def stream(start=0, pi=0, pc=1, k=8):
    it = data.open(config).train_iterator(global_batch_size=4, seed=7, start_step=start,
                                          process_index=pi, process_count=pc)
    return [b['uid'] for b in take(it, k)]

  full = stream()
  np.testing.assert_array_equal(np.concatenate(stream()), np.concatenate(full))
  np.testing.assert_array_equal(np.concatenate(stream(start=3, k=5)), np.concatenate(full[3:]))
  halves = zip(stream(pi=0, pc=2), stream(pi=1, pc=2))
  np.testing.assert_array_equal(np.concatenate([np.concatenate(h) for h in halves]),
                                np.concatenate(full))
  assert set(np.concatenate(full)) == set(range(5, 12))


def test_eval_slice_and_errors_before_compute():
  batches = list(data.open(cfg()).eval_iterator('test_id[2:7]', global_batch_size=4,
                                                process_index=0, process_count=1))
  mask = np.concatenate([b['mask'] for b in batches]) == 1
  np.testing.assert_array_equal(np.concatenate([b['uid'] for b in batches])[mask],
                                1000 + np.arange(2, 7))
  assert data.open(cfg()).num_examples('test_id[:50%]') == 5
  info = data.open(cfg(eval_splits=['test_id[:20%]', 'val_ood'])).info
  assert data.open(cfg(eval_splits=['test_id[:20%]'])).eval_splits == ('test_id[:20%]',)
  assert 'train' not in data.open(cfg(train_split='train[:6%]')).eval_splits
  assert info.num_examples == {'train': N_TRAIN}
  with pytest.raises(ValueError, match="Unknown split 'tain'"):
    data.open(cfg(train_split='tain[:6%]'))
  with pytest.raises(ValueError, match='beyond the 20 examples'):
    data.open(cfg(train_split='train[:21]'))
  with pytest.raises(ValueError, match="beyond the 10 examples of split 'val_id'"):
    data.open(cfg(eval_splits=['val_id[:11]']))


def test_tfds_dataset_slices_its_source():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=10):
    config = {'name': 'cifar10', 'train_split': 'train[:60%]', 'num_threads': 1}
    info = data.open(config).info
    assert info.num_examples['train[:60%]'] == 6
    whole = list(data.open({**config, 'augment': False}).eval_iterator(
        'train', global_batch_size=10, process_index=0, process_count=1))[0]
    it = data.open({**config, 'augment': False}).train_iterator(global_batch_size=6, seed=0,
                                                                process_index=0, process_count=1)
    batch = next(it)  # one epoch of the 6-example slice: the first 6 of the split.
    assert sorted(map(bytes, batch['image'].reshape(6, -1))) == sorted(
        map(bytes, whole['image'][:6].reshape(6, -1)))
