"""Groups and group-aware samplers (vitreg_jax/data/groups.py): the derived group attribute,
group-balanced frequencies, JTT's upsampled epochs, and exact resume of both streams."""

import json

import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax.data import groups

DOMINOES = dict(name='dominoes', num_train=400, num_val=40, num_test=40, num_threads=1)


def batches(config, *, start, count, batch=32, pi=0, pc=1):
  it = data.open(config).train_iterator(global_batch_size=batch, seed=3, start_step=start,
                                        process_index=pi, process_count=pc)
  return [next(it) for _ in range(count)]


def test_dominoes_gets_a_derived_group_attribute():
  info = data.open(DOMINOES).info
  assert info.attributes == ('spurious', 'group') and info.attribute_classes['group'] == 4
  ev = next(iter(data.open(DOMINOES).eval_iterator('val_id', global_batch_size=40)))
  np.testing.assert_array_equal(ev['group'], 2 * ev['label'] + ev['spurious'])
  # 90% agreement per class: 180 / 20 / 20 / 180 training examples per group.
  np.testing.assert_array_equal(data.open(DOMINOES).group_counts(), [180, 20, 20, 180])


def test_group_balanced_draws_every_group_equally_often():
  config = dict(DOMINOES, sampler='group_balanced')
  drawn = np.concatenate([b['group'] for b in batches(config, start=0, count=150)])
  assert (drawn == 2 * np.concatenate(
      [b['label'] for b in batches(config, start=0, count=150)]) + np.concatenate(
          [b['spurious'] for b in batches(config, start=0, count=150)])).all()
  freq = np.bincount(drawn, minlength=4) / len(drawn)
  # 4800 draws: the standard error of each frequency is 0.006; uniform sampling gives 0.05.
  np.testing.assert_allclose(freq, 0.25, atol=0.025)
  uniform = np.concatenate([b['group'] for b in batches(DOMINOES, start=0, count=25)])
  assert np.bincount(uniform, minlength=4)[1] / len(uniform) < 0.1


@pytest.mark.parametrize('sampler', ['group_balanced', 'upsample'])
def test_resume_and_process_split_give_the_same_stream(sampler, tmp_path):
  config = dict(DOMINOES, sampler=sampler)
  if sampler == 'upsample':
    (tmp_path / 'e.json').write_text(json.dumps({'indices': [1, 5, 7]}))
    config['upsample'] = dict(file=str(tmp_path / 'e.json'), factor=4)
  full = batches(config, start=0, count=16)
  resumed = batches(config, start=11, count=5)
  for a, b in zip(full[11:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  halves = [batches(config, start=11, count=5, pi=i, pc=2) for i in range(2)]
  for k in range(5):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][k]['image'], halves[1][k]['image']]), full[11 + k]['image'])


def test_upsample_counts_equal_the_authors_concat_dataset(tmp_path):
  # anniesch/jtt run_expt.py: ConcatDataset([train, Subset(train, aug_indices * up_weight)]),
  # i.e. every example once plus up_weight more copies of each error: lambda + 1 in all.
  n, errors_set, factor = 10, [2, 7, 9], 4
  authors = np.bincount(list(range(n)) + errors_set * factor, minlength=n)
  (tmp_path / 'e.json').write_text(json.dumps({'indices': errors_set}))
  for copies, expected in ((None, authors), ('authors', authors),
                           ('lambda', authors - np.isin(np.arange(n), errors_set))):
    upsample = dict(file=str(tmp_path / 'e.json'), factor=factor)
    if copies:
      upsample['copies'] = copies
    order = groups.make_order(dict(sampler='upsample', upsample=upsample), range(n), None,
                              seed=0, global_batch=4)
    epoch = [order(p) % n for p in range(len(order))]
    assert np.bincount(epoch, minlength=n).tolist() == expected.tolist(), copies
  assert groups.upsample_repeats(dict(factor=5)) == 6  # the authors' 5 = the old 6
  assert groups.upsample_repeats(dict(factor=6, copies='lambda')) == 6
  for bad, match in ((dict(factor=2, copies='paper'), "valid: \\['authors', 'lambda'\\]"),
                     (dict(factor=0), 'must be >= 1'), (dict(factr=2), 'Unknown data.upsample')):
    with pytest.raises(errors.UserError, match=match):
      groups.upsample_repeats(bad)


def test_upsample_repeats_the_error_set_per_epoch():
  order = groups.UpsampleOrder(10, [2, 7], repeats=3, seed=0)
  assert len(order) == 14
  epoch = [order(p) % 10 for p in range(14)]
  assert np.bincount(epoch, minlength=10).tolist() == [1, 1, 3, 1, 1, 1, 1, 3, 1, 1]
  assert len({order(p) for p in range(14)}) == 14  # copies get their own augmentation index
  assert [order(p) % 10 for p in range(14, 28)] != epoch  # a fresh permutation per epoch
  with pytest.raises(ValueError, match=r'\[0, 10\)'):
    groups.UpsampleOrder(10, [10], repeats=2, seed=0)


def test_npz_groups_and_a_dataset_without_groups(tmp_path):
  rng = np.random.default_rng(0)
  n = 12
  images = rng.integers(0, 256, (n, 4, 4, 3), np.uint8)
  np.savez(tmp_path / 'g.npz', images=images, labels=np.arange(n) % 2,
           spurious=(np.arange(n) // 2) % 3)
  np.savez(tmp_path / 'plain.npz', images=images, labels=np.arange(n) % 2)
  info = data.open({'name': 'npz', 'path': str(tmp_path / 'g.npz')}).info
  assert info.attribute_classes['group'] == 6  # 2 labels x 3 spurious values
  ids = data.open({'name': 'npz', 'path': str(tmp_path / 'g.npz')}).group_counts()
  np.testing.assert_array_equal(ids, np.bincount((np.arange(n) % 2) * 3 +
                                                 (np.arange(n) // 2) % 3, minlength=6))
  with pytest.raises(ValueError, match='needs a dataset with groups'):
    data.open({'name': 'npz', 'path': str(tmp_path / 'plain.npz'),
               'sampler': 'group_balanced'})
  with pytest.raises(ValueError, match='valid samplers'):
    data.open(dict(DOMINOES, sampler='balanced'))
  with pytest.raises(ValueError, match=r'python -m vitreg_jax\.jtt'):
    data.open(dict(DOMINOES, sampler='upsample'))
