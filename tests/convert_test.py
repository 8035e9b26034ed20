"""Tests of vitreg_jax.models.convert: .npz round trip, position-embedding resampling, head reset,
timm and big_vision weights against logits saved by their fixture scripts."""

import json
import os

import jax
import numpy as np
import pytest

from vitreg_jax import models
from vitreg_jax.models import convert
from vitreg_jax.models import weight_layouts

TINY = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=8)


def _random_params(model, hw, seed=0):
  """Random params with the model's structure (NumPy-filled: no init compilation)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, *hw, 3), np.float32))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes['params'])


def _leaves_equal(a, b):
  fa, fb = convert.flatten(a), convert.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_round_trip_is_exact(tmp_path):
  model = models.create('vit', 10, **TINY)
  params = _random_params(model, (32, 32))
  path = str(tmp_path / 'vit.npz')
  convert.save_npz(path, params)
  with np.load(path) as data:  # the public layout: flat '/'-joined keys
    assert 'Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel' in data.files
    assert data['Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out/kernel'].shape == (
        2, 8, 16)
  init = _random_params(model, (32, 32), seed=1)
  loaded = convert.load_vit_npz(path, init, model=model, image_hw=(32, 32))
  _leaves_equal(loaded, params)
  x = np.random.RandomState(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(model.apply({'params': loaded}, x)[0],
                                model.apply({'params': params}, x)[0])


def test_new_grid_and_new_head(tmp_path):
  src = models.create('vit', 10, **TINY)
  params = _random_params(src, (32, 32))  # 4 x 4 grid + CLS
  path = str(tmp_path / 'vit.npz')
  convert.save_npz(path, params)
  dst = models.create('vit', 3, **TINY)
  init = _random_params(dst, (64, 32), seed=1)  # 8 x 4 grid
  loaded = convert.load_vit_npz(path, init, model=dst, image_hw=(64, 32))
  pe_old = params['Transformer']['posembed_input']['pos_embedding']
  pe_new = loaded['Transformer']['posembed_input']['pos_embedding']
  assert pe_new.shape == (1, 33, 16)
  np.testing.assert_array_equal(pe_new[0, 0], pe_old[0, 0])  # CLS kept apart
  # Columns keep their 4 samples; each pair of new rows interpolates old rows bilinearly
  # (half-pixel centres: new row 2r+1 = 3/4 old row r + 1/4 old row r+1).
  grid_old = pe_old[0, 1:].reshape(4, 4, 16)
  grid_new = np.asarray(pe_new[0, 1:]).reshape(8, 4, 16)
  np.testing.assert_allclose(grid_new[1], 0.75 * grid_old[0] + 0.25 * grid_old[1], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(grid_new[0], grid_old[0], rtol=1e-5, atol=1e-6)
  assert loaded['head']['kernel'].shape == (16, 3)
  assert not np.any(loaded['head']['kernel']) and not np.any(loaded['head']['bias'])
  np.testing.assert_array_equal(loaded['embedding']['kernel'], params['embedding']['kernel'])
  # Same classes: the head is kept unless reset_head=True.
  same = convert.load_vit_npz(path, _random_params(src, (32, 32), 1), model=src, image_hw=(32, 32),
                              reset_head=True)
  assert not np.any(same['head']['kernel'])


def test_resample_posemb_constant_and_prefix_change():
  pe = np.ones((1, 1 + 9, 4), np.float32) * np.arange(4)
  pe[0, 0] = 7.0
  out = convert.resample_posemb(pe, (5, 5), 1)
  np.testing.assert_allclose(out[0, 1:], np.broadcast_to(np.arange(4.0), (25, 4)), atol=1e-6)
  np.testing.assert_array_equal(out[0, 0], 7.0)
  assert convert.resample_posemb(pe, (3, 3), 0).shape == (1, 9, 4)  # GAP model: CLS dropped
  no_cls = convert.resample_posemb(pe[:, 1:], (3, 3), 1)
  np.testing.assert_array_equal(no_cls[0, 0], 0.0)
  with pytest.raises(ValueError, match='Cannot infer the patch grid'):
    convert.resample_posemb(np.zeros((1, 12, 4)), (2, 2), 0)


def test_token_checkpoint_into_gap_model(tmp_path):
  src = models.create('vit', 10, **TINY)
  path = str(tmp_path / 'vit.npz')
  params = _random_params(src, (32, 32))
  convert.save_npz(path, params)
  gap = models.create('vit', 10, **TINY, classifier='gap')
  loaded = convert.load_vit_npz(path, _random_params(gap, (32, 32), 1), model=gap,
                                image_hw=(32, 32))
  assert 'cls' not in loaded
  np.testing.assert_array_equal(loaded['Transformer']['posembed_input']['pos_embedding'][0],
                                params['Transformer']['posembed_input']['pos_embedding'][0, 1:])


def test_mismatch_errors_name_the_keys(tmp_path):
  src = models.create('vit', 10, **TINY)
  path = str(tmp_path / 'vit.npz')
  convert.save_npz(path, _random_params(src, (32, 32)))
  wider = models.create('vit', 10, **{**TINY, 'mlp_dim': 48})
  with pytest.raises(ValueError, match=r'MlpBlock_0/Dense_0/kernel: checkpoint \(16, 32\) vs '
                                       r'model \(16, 48\)'):
    convert.load_vit_npz(path, _random_params(wider, (32, 32)), model=wider, image_hw=(32, 32))
  deeper = models.create('vit', 10, **{**TINY, 'depth': 3})
  with pytest.raises(ValueError, match=r"missing in checkpoint: \['Transformer/encoderblock_2"):
    convert.load_vit_npz(path, _random_params(deeper, (32, 32)), model=deeper, image_hw=(32, 32))
  shallow = models.create('vit', 10, **{**TINY, 'depth': 1})
  with pytest.raises(ValueError, match=r"not in the model: \['Transformer/encoderblock_1"):
    convert.load_vit_npz(path, _random_params(shallow, (32, 32)), model=shallow,
                         image_hw=(32, 32))
  with pytest.raises(ValueError, match='reset_head=False'):
    other = models.create('vit', 4, **TINY)
    convert.load_vit_npz(path, _random_params(other, (32, 32)), model=other, image_hw=(32, 32),
                         reset_head=False)


# ---- Public weights in other layouts: timm state_dicts and big_vision's current ViT ---------
# The fixtures under tests/fixtures were written once by make_timm_fixture.py (timm's own
# forward) and make_big_vision_fixture.py (big_vision's own `vit.Model` from a checkout, its
# logits also checked against a NumPy restatement; see that script's docstring).
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
TIMM = {'token': 'safetensors', 'noembedcls': 'npz', 'gap': 'safetensors'}


def _fixture(prefix, name, ext='npz'):
  io = np.load(os.path.join(FIXTURES, f'{prefix}_{name}_io.npz'))
  config = json.loads(str(io['config']))
  return os.path.join(FIXTURES, f'{prefix}_{name}.{ext}'), io['image'], io['logits'], config


def _load_and_run(path, image, config, layout, **overrides):
  model = models.create('vit', 5, **{**config['vit'], **overrides})
  params = convert.load_vit(path, _random_params(model, config['image_hw'], seed=7), model=model,
                            image_hw=config['image_hw'], layout=layout)
  # One compiled forward: faster than op-by-op dispatch on the shared CPU.
  return np.asarray(jax.jit(model.apply)({'params': params}, image)[0]), params


@pytest.mark.parametrize('name', sorted(TIMM))
def test_timm_state_dict_reproduces_timm_logits(name):
  path, image, expected, config = _fixture('timm_vit', name, TIMM[name])
  logits, params = _load_and_run(path, image, config, 'timm')
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  assert ('cls' in params) == (name != 'gap')
  if name == 'noembedcls':  # timm's qkv_bias=False fits a ViT without q/k/v biases too.
    no_bias, params = _load_and_run(path, image, config, 'timm', qkv_bias=False)
    np.testing.assert_allclose(no_bias, expected, rtol=1e-5, atol=1e-5)
    assert 'bias' not in params['Transformer']['encoderblock_0'][
        'MultiHeadDotProductAttention_0']['query']
  if name == 'token':  # The exact GELU is what makes the logits equal, not a loose tolerance.
    approx, _ = _load_and_run(path, image, config, 'timm', gelu_approximate=True)
    assert np.abs(approx - expected).max() > 1e-4


@pytest.mark.parametrize('name', ['tok', 'map', 'gap_sincos'])
def test_big_vision_checkpoint_reproduces_reference_logits(name):
  path, image, expected, config = _fixture('bv_vit', name)
  logits, params = _load_and_run(path, image, config, 'big_vision')
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  if name == 'tok':  # big_vision's CLS token has no position embedding: a zero row in ours.
    pe = params['Transformer']['posembed_input']['pos_embedding']
    with np.load(path) as ckpt:
      np.testing.assert_array_equal(pe[0, 1:], ckpt['pos_embedding'][0])
    np.testing.assert_array_equal(pe[0, 0], 0.0)
  # Auto-detection (kind='npz') reads the same file the same way.
  auto, _ = _load_and_run(path, image, config, None)
  np.testing.assert_array_equal(auto, logits)


def test_big_vision_checkpoint_fine_tunes_at_a_new_resolution():
  path, _, _, config = _fixture('bv_vit', 'tok')
  model = models.create('vit', 3, **config['vit'])
  params = convert.load_vit(path, _random_params(model, (48, 48)), model=model,
                            image_hw=(48, 48), layout='big_vision')
  pe = params['Transformer']['posembed_input']['pos_embedding']
  assert pe.shape == (1, 1 + 36, 32) and not np.any(pe[0, 0])
  assert params['head']['kernel'].shape == (24, 3) and not np.any(params['head']['kernel'])


def test_wrong_kind_and_unsupported_weights_are_named(tmp_path):
  bv_path, _, _, bv_config = _fixture('bv_vit', 'map')
  model = models.create('vit', 5, **bv_config['vit'])
  init = _random_params(model, (32, 32))
  with pytest.raises(ValueError, match="looks like a 'big_vision' checkpoint.*not 'timm'"):
    convert.load_vit(bv_path, init, model=model, image_hw=(32, 32), layout='timm')
  token = models.create('vit', 5, **{**bv_config['vit'], 'classifier': 'token'})
  with pytest.raises(ValueError, match="MAP head: set model classifier='map'"):
    convert.load_vit(bv_path, _random_params(token, (32, 32)), model=token, image_hw=(32, 32))
  timm_path, _, _, timm_config = _fixture('timm_vit', 'token', 'safetensors')
  state = dict(weight_layouts.read(timm_path))
  state['blocks.0.ls1.gamma'] = np.ones(32, np.float32)
  bad = str(tmp_path / 'layerscale.npz')
  np.savez(bad, **state)
  vit = models.create('vit', 5, **timm_config['vit'])
  with pytest.raises(ValueError, match=r'blocks\.0\.ls1\.gamma \(layer scale'):
    convert.load_vit(bad, _random_params(vit, (32, 32)), model=vit, image_hw=(32, 32))
  with pytest.raises(ValueError, match='model_name="vit" only'):
    convert.load_vit(timm_path, {}, model=models.create('resnet', 5, depth=18),
                     image_hw=(32, 32))


def test_init_from_kinds():
  from vitreg_jax.training import pretrained  # pylint: disable=g-import-not-at-top
  path, image, expected, config = _fixture('timm_vit', 'token', 'safetensors')
  model = models.create('vit', 5, **config['vit'])
  params = pretrained.init_params_from(dict(path=path, kind='timm', reset_head=False),
                                  _random_params(model, (32, 32)), model=model,
                                  image_hw=(32, 32))
  np.testing.assert_allclose(model.apply({'params': params}, image)[0], expected, atol=1e-5,
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r"kind must be one of \['checkpoint', 'npz', "
                                       r"'big_vision', 'timm', 'diverse_vit'\]"):
    pretrained.init_params_from(dict(path=path, kind='torch'), {}, model=model, image_hw=(32, 32))
  with pytest.raises(FileNotFoundError, match='is not a file'):
    pretrained.init_params_from(dict(path=FIXTURES, kind='big_vision'), {}, model=model,
                           image_hw=(32, 32))
