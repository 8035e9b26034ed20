"""The authors' post-activation ResNet (`resnet`) beside the pre-activation one (`preresnet`):
block structure against NumPy transcriptions of xxxnell/how-do-vits-work's blocks, parameter
counts against their architecture definitions counted by hand, and what separates the two
families (normalized-then-ReLU'd block outputs vs the raw residual stream)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from testutil import np_init
from vitreg_jax import models
from vitreg_jax.models import preresnet
from vitreg_jax.models import resnet


def _count(model, image_hw=(32, 32)):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_hw, 3)))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


def _authors_bottleneck(in_c, c, stride, post):
  """Trainable parameters of one of their bottlenecks (width c, output 4c): three bias-free
  convs; post-activation (resnet_dnn_block.py, `Bottleneck`): a BN (scale, bias) after each
  conv and a conv + BN projection shortcut; pre-activation (preresnet_dnn_block.py): a BN
  before each conv (the first on in_c channels) and a bare conv projection."""
  n = in_c * c + 9 * c * c + c * 4 * c
  n += 2 * (c + c + 4 * c) if post else 2 * (in_c + c + c)
  if stride != 1 or in_c != 4 * c:
    n += in_c * 4 * c + (2 * 4 * c if post else 0)
  return n


def _authors_resnet50_count(num_classes, post):
  """Their CIFAR ResNet-50 (`stem=False`: 3x3 conv stem, + BN-ReLU when post-activation;
  stages (3, 4, 6, 3) of widths 64..512; GAPBlock head, BNGAPBlock for pre-activation)."""
  n, in_c = 3 * 3 * 3 * 64 + (2 * 64 if post else 0), 64
  for s, blocks in enumerate((3, 4, 6, 3)):
    for b in range(blocks):
      n += _authors_bottleneck(in_c, 64 * 2**s, 2 if s and not b else 1, post)
      in_c = 4 * 64 * 2**s
  return n + (0 if post else 2 * in_c) + in_c * num_classes + num_classes


def test_resnet50_parameter_counts_equal_the_authors():
  # torchvision's ResNet-50 (post-activation, 7x7 stem, 1000 classes) has 25,557,032
  # parameters; the CIFAR stem saves 7 * 7 * 3 * 64 - 3 * 3 * 3 * 64 = 7,680 of them.
  assert _authors_resnet50_count(1000, post=True) == 25_557_032 - 7_680
  assert _authors_resnet50_count(100, post=True) == 23_705_252
  assert _authors_resnet50_count(100, post=False) == 23_697_572
  post = models.create('resnet', 100, depth=50, stem='cifar')
  pre = models.create('preresnet', 100, depth=50, stem='cifar')
  assert _count(post) == 23_705_252
  assert _count(pre) == 23_697_572
  assert _count(models.create('resnet', 1000, depth=50, stem='imagenet'), (64, 64)) == 25_557_032


def _np_conv(x, w, stride):
  """PyTorch's conv (padding kernel // 2 on every side), one kernel offset at a time."""
  k = w.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  ho, wo = (x.shape[1] + 2 * p - k) // stride + 1, (x.shape[2] + 2 * p - k) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[-1]))
  for di in range(k):
    for dj in range(k):
      patch = xp[:, di:di + stride * (ho - 1) + 1:stride, dj:dj + stride * (wo - 1) + 1:stride]
      out += patch @ w[di, dj]
  return out


def _np_bn(x, params, stats, eps=1e-5):
  return ((x - stats['mean']) / np.sqrt(stats['var'] + eps) * params['scale']
          + params['bias'])


def _perturbed_stats(variables, seed):
  """Running statistics away from (0, 1), so BN's normalization is visible."""
  rng = np.random.RandomState(seed)
  fill = lambda path, v: (rng.uniform(0.5, 2.0, v.shape) if path[-1].key == 'var'
                          else rng.normal(0.0, 0.5, v.shape)).astype(np.float32)
  return dict(variables, batch_stats=jax.tree_util.tree_map_with_path(
      fill, variables['batch_stats']))


def _np_post_bottleneck(x, p, s, stride):
  """Their `Bottleneck.forward`: conv-BN-ReLU, conv(stride)-BN-ReLU, conv-BN, + shortcut, ReLU."""
  conv = lambda y, name, st=1: _np_conv(y, p[name]['kernel'], st)
  y = np.maximum(_np_bn(conv(x, 'Conv_0'), p['BatchNorm_0'], s['BatchNorm_0']), 0)
  y = np.maximum(_np_bn(conv(y, 'Conv_1', stride), p['BatchNorm_1'], s['BatchNorm_1']), 0)
  y = _np_bn(conv(y, 'Conv_2'), p['BatchNorm_2'], s['BatchNorm_2'])
  skip = x if 'shortcut' not in p else _np_bn(conv(x, 'shortcut', stride), p['shortcut_norm'],
                                              s['shortcut_norm'])
  return np.maximum(skip + y, 0)


@pytest.mark.parametrize('in_c,features,stride', [(3, 2, 2), (8, 2, 1)])
def test_post_activation_bottleneck_matches_the_authors_block(in_c, features, stride):
  block = resnet.PostBottleneckBlock(features, strides=stride)
  x = np.random.RandomState(0).normal(size=(2, 6, 6, in_c)).astype(np.float32)  # even: the
  variables = _perturbed_stats(np_init(block, x, 1), 2)   # padding of stride 2 shows
  assert ('shortcut' in variables['params']) == (stride != 1 or in_c != 4 * features)
  got = block.apply(variables, x)
  want = _np_post_bottleneck(x.astype(np.float64), variables['params'],
                             variables['batch_stats'], stride)
  assert got.shape == want.shape == (2, 6 // stride, 6 // stride, 4 * features)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_post_activation_basic_block_matches_the_authors_block():
  block = resnet.PostBasicBlock(4, strides=2)
  x = np.random.RandomState(0).normal(size=(2, 6, 4, 3)).astype(np.float32)
  variables = _perturbed_stats(np_init(block, x, 1), 2)
  p, s = variables['params'], variables['batch_stats']
  y = np.maximum(_np_bn(_np_conv(x, p['Conv_0']['kernel'], 2), p['BatchNorm_0'],
                        s['BatchNorm_0']), 0)
  y = _np_bn(_np_conv(y, p['Conv_1']['kernel'], 1), p['BatchNorm_1'], s['BatchNorm_1'])
  skip = _np_bn(_np_conv(x, p['shortcut']['kernel'], 2), p['shortcut_norm'], s['shortcut_norm'])
  np.testing.assert_allclose(block.apply(variables, x), np.maximum(skip + y, 0), rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize('name', ['resnet', 'preresnet'])
@pytest.mark.parametrize('depth,stem,hw', [(18, 'cifar', (16, 8)), (50, 'imagenet', (64, 32))])
def test_shapes_stems_and_batch_stats(name, depth, stem, hw):
  model = models.create(name, 3, depth=depth, stem=stem, width=2)
  x = np.random.RandomState(0).normal(size=(2, *hw, 3)).astype(np.float32)
  variables = np_init(model, x, 1)
  logits, out = model.apply(variables, x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  down = 1 if stem == 'cifar' else 4
  expansion = 4 if depth == 50 else 1
  for s in range(1, 5):
    scale = down * 2**(s - 1)
    assert out[f'stage{s}'].shape == (2, hw[0] // scale, hw[1] // scale, 2**s * expansion)
  params = variables['params']
  # Post-activation: BN-ReLU in the CIFAR stem, BN on projections, no final BN (GAPBlock);
  # pre-activation: a bare conv stem, bare projections, BN-ReLU before pooling (BNGAPBlock).
  post = name == 'resnet'
  assert ('stem_norm' in params) == (post or stem == 'imagenet')
  assert ('shortcut_norm' in params['stage2_block0']) == post
  assert ('final_norm' in params) == (not post)
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert set(state) == {'batch_stats'}
  with pytest.raises(ValueError, match='head_mask must be None'):
    model.apply(variables, x, head_mask=jnp.ones((8, 1)))


def test_post_activation_blocks_output_relu_maps_pre_activation_the_raw_stream():
  x = np.random.RandomState(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  for name in ('resnet', 'preresnet'):
    model = models.create(name, 3, depth=18, width=4)
    _, out = model.apply(np_init(model, x, 1), x)
    outputs = [np.asarray(out[f'block{i}']['output']) for i in range(8)]
    if name == 'resnet':  # ReLU(shortcut + BN(...)): non-negative, with exact zeros
      assert all(o.min() >= 0 and (o == 0).mean() > 0.05 for o in outputs)
      np.testing.assert_array_equal(out['encoded'], out['stage4'])   # GAP of the last block
    else:  # x + F(x): signed, no ReLU after the addition
      assert all(o.min() < 0 for o in outputs)
      assert np.asarray(out['encoded']).min() >= 0   # the final BN-ReLU


def test_drop_path_acts_in_training_only():
  model = models.create('resnet', 3, depth=18, width=2, drop_path=0.7)
  plain = models.create('resnet', 3, depth=18, width=2)
  x = np.random.RandomState(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
  variables = np_init(model, x, 1)
  np.testing.assert_array_equal(model.apply(variables, x)[0], plain.apply(variables, x)[0])
  (dropped, _), _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                rngs={'dropout': jax.random.key(0)})
  (kept, _), _ = plain.apply(variables, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(dropped, kept)


def test_preresnet_keeps_the_earlier_resnet_parameters():
  """`preresnet` is the library's earlier `resnet`: the same parameter tree (its checkpoints
  load) and blocks of `preresnet.BottleneckBlock` / `BasicBlock`."""
  model = models.create('preresnet', 3, depth=18, width=2)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  assert set(shapes) == {'stem_conv', 'final_norm', 'head'} | {
      f'stage{s}_block{b}' for s in range(1, 5) for b in range(2)}
  assert set(shapes['stage2_block0']) == {'BatchNorm_0', 'BatchNorm_1', 'Conv_0', 'Conv_1',
                                          'shortcut'}
  assert preresnet.BottleneckBlock.expansion == 4
