"""RandAugment ops against NumPy references, the policy's determinism, and the CIFAR recipe
options (`crop_padding`, `randaugment`) through the data pipeline."""

import numpy as np
import pytest
from PIL import Image

from vitreg_jax import data
from vitreg_jax.data import preprocess, randaugment


def _image(seed=0, size=(12, 10)):
  return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _op(x, name, arg, fill=(7, 8, 9)):
  return np.asarray(randaugment.apply_op(Image.fromarray(x), name, arg, fill=fill,
                                         resample=Image.NEAREST))


def test_pixel_ops_equal_numpy_references():
  x = _image()
  np.testing.assert_array_equal(_op(x, 'Invert', None), 255 - x)
  np.testing.assert_array_equal(_op(x, 'Solarize', 100), np.where(x >= 100, 255 - x, x))
  np.testing.assert_array_equal(_op(x, 'SolarizeAdd', 50),
                                np.where(x < 128, np.minimum(x.astype(int) + 50, 255), x))
  np.testing.assert_array_equal(_op(x, 'Posterize', 3), x & 0b11100000)
  np.testing.assert_array_equal(_op(x, 'Posterize', 8), x)
  np.testing.assert_array_equal(_op(x, 'Brightness', 1.0), x)
  # Brightness f blends with black: round-to-nearest of f * x, clipped.
  np.testing.assert_allclose(_op(x, 'Brightness', 0.5), x * 0.5, atol=1)


def test_geometric_ops_shift_and_fill():
  x = _image()
  h, w = x.shape[:2]
  # TranslateXRel by +0.2 of the width (2 pixels): output column c reads input column c + 2.
  out = _op(x, 'TranslateXRel', 0.2)
  np.testing.assert_array_equal(out[:, :w - 2], x[:, 2:])
  assert (out[:, w - 2:] == (7, 8, 9)).all()
  out = _op(x, 'TranslateYRel', -3 / h)
  np.testing.assert_array_equal(out[3:], x[:h - 3])
  assert (out[:3] == (7, 8, 9)).all()
  np.testing.assert_array_equal(_op(x, 'Rotate', 0.0), x)
  np.testing.assert_array_equal(_op(x, 'ShearX', 0.0), x)
  # ShearX f: output (x, y) reads input (x + f y, y); row 0 is unchanged.
  np.testing.assert_array_equal(_op(x, 'ShearX', 0.25)[0], x[0])


def test_level_to_argument_table():
  rng = np.random.default_rng(0)
  arg = lambda name, level: randaugment.op_argument(name, level, rng)  # noqa: E731
  assert arg('Posterize', 9) == 3 and arg('PosterizeIncreasing', 9) == 1
  assert arg('Solarize', 9) == 230 and arg('SolarizeIncreasing', 9) == 26
  assert arg('SolarizeAdd', 10) == 110
  assert arg('Contrast', 9) == pytest.approx(1.72) and arg('Contrast', 0) == pytest.approx(0.1)
  assert {round(abs(arg('Rotate', 9)), 6) for _ in range(20)} == {27.0}
  signs = {np.sign(arg('ShearX', 10)) for _ in range(50)}
  assert signs == {-1.0, 1.0}
  assert {abs(arg('TranslateXRel', 10)) for _ in range(5)} == {0.45}
  assert arg('Equalize', 5) is None


def test_spec_parsing_and_errors():
  policy = randaugment.from_string('rand-m9-n2-mstd1.0', fill=(1, 2, 3))
  assert (policy.num_ops, policy.magnitude, policy.magnitude_std) == (2, 9.0, 1.0)
  assert policy.fill == (1, 2, 3) and policy.ops == randaugment.RAND_OPS
  assert randaugment.from_string('rand-m7-n3-mstd101-inc1').magnitude_std == float('inf')
  assert randaugment.from_string('rand-inc1').ops[4] == 'PosterizeIncreasing'
  with pytest.raises(ValueError, match="start with 'rand'"):
    randaugment.from_string('augmix-m5')
  with pytest.raises(ValueError, match="Unknown RandAugment section 'w0'"):
    randaugment.from_string('rand-m9-w0')


def test_policy_is_deterministic_in_its_generator_and_varies_across_seeds():
  x = _image(1, (32, 32))
  policy = randaugment.from_string('rand-m9-n2-mstd1.0')
  outs = [policy(x, np.random.default_rng([5, i])) for i in range(40)]
  again = [policy(x, np.random.default_rng([5, i])) for i in range(40)]
  for a, b in zip(outs, again):
    assert a.dtype == np.uint8 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
  changed = sum(not np.array_equal(o, x) for o in outs)
  # P(no op applied) = 1/4 per image: about 30 of 40 change; all or none would be a bug.
  assert 15 <= changed < 40
  assert len({o.tobytes() for o in outs}) > 20
  np.testing.assert_array_equal(randaugment.RandAugment(num_ops=0)(x, np.random.default_rng()),
                                x)
  gray = randaugment.RandAugment(num_ops=3, magnitude=10)(x[..., :1], np.random.default_rng(3))
  assert gray.shape == (32, 32, 1)


def test_pad_random_crop_matches_slicing_of_the_padded_image():
  x = _image(2, (8, 8))
  padded = np.zeros((12, 12, 3), np.uint8)
  padded[2:10, 2:10] = x
  tops = set()
  for seed in range(50):
    out = preprocess.pad_random_crop(x, 8, 2, np.random.default_rng(seed))
    top, left = np.random.default_rng(seed).integers(0, (5, 5))  # the same draw.
    np.testing.assert_array_equal(out, padded[top:top + 8, left:left + 8])
    tops.add(int(top))
  assert tops == {0, 1, 2, 3, 4}
  with pytest.raises(ValueError, match='smaller than the crop'):
    preprocess.pad_random_crop(x, 16, 2, np.random.default_rng(0))


def _npz(tmp_path, n=6):
  path = tmp_path / 'cifar_like.npz'
  rng = np.random.default_rng(0)
  np.savez(path, images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
           labels=np.arange(n) % 3, uid=np.arange(n))
  return str(path)


def test_recipe_options_through_the_pipeline_are_resumable(tmp_path):
  config = dict(name='npz', path=_npz(tmp_path), crop_padding=4,
                randaugment='rand-m9-n2-mstd1.0', num_threads=1,
                mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))
  data.open(config)

  def stream(start, k):
    it = data.open(config).train_iterator(global_batch_size=4, seed=3, start_step=start,
                                          process_index=0, process_count=1)
    return [next(it) for _ in range(k)]

  full, resumed = stream(0, 6), stream(2, 4)
  for a, b in zip(full[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert full[0]['image'].shape == (4, 32, 32, 3) and full[0]['image'].dtype == np.uint8
  plain = dict(config, randaugment=None, crop_padding=None, augment=False)
  clean = next(data.open(plain).train_iterator(global_batch_size=4, seed=3, process_index=0,
                                               process_count=1))
  np.testing.assert_array_equal(clean['uid'], full[0]['uid'])
  assert not np.allclose(clean['image'], full[0]['image'])
  evaluated = next(data.open(config).eval_iterator('train', global_batch_size=6,
                                                   process_index=0, process_count=1))
  evaluated_plain = next(data.open(plain).eval_iterator('train', global_batch_size=6,
                                                        process_index=0, process_count=1))
  np.testing.assert_array_equal(evaluated['image'], evaluated_plain['image'])  # eval: no aug.


def test_bad_augmentation_options_fail_at_get_info(tmp_path):
  path = _npz(tmp_path)
  with pytest.raises(ValueError, match='Unknown RandAugment section'):
    data.open(dict(name='npz', path=path, randaugment='rand-m9-x2'))
  with pytest.raises(ValueError, match='crop_padding must be None or an integer'):
    data.open(dict(name='npz', path=path, crop_padding=-1))
