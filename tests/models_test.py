"""Tests of the model registry and every model family (tiny variants, 32-px / 64x32 inputs)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from testutil import np_init
from vitreg_jax import models
from vitreg_jax.models import alternet

TINY_VIT = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8, head_zeroinit=False)
TINY_ARVIT = dict(width=24, depth=2, num_heads=4, patch_size=8, head_zeroinit=False)



def _count(model, image_hw):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_hw, 3)))
  return sum(x.size for x in jax.tree.leaves(shapes['params']))


def _images(hw=(32, 32), batch=2, seed=0):
  return np.random.RandomState(seed).normal(size=(batch, *hw, 3)).astype(np.float32)


@pytest.mark.parametrize('variant,expected', [('Ti/16', 5_717_416), ('S/16', 22_050_664),
                                              ('B/16', 86_567_656)])
def test_vit_parameter_counts_match_reference(variant, expected):
  model = models.create('vit', 1000, variant=variant, classifier='token', posemb='learn')
  assert _count(model, (224, 224)) == expected


def test_vit_variants_and_arvit_baseline_geometry():
  assert models.create('vit', 10, variant='L/16').depth == 24
  small = models.create('vit', 10, variant='Ti/4')
  assert (small.width, small.depth, small.num_heads, small.patch_size) == (192, 12, 3, 4)
  base = models.create('vit', 10, variant='Ti6x12/16')
  assert (base.width, base.depth, base.num_heads, base.mlp_dim) == (192, 6, 12, 768)
  paper = models.create('arvit', 10)
  assert (paper.width, paper.depth, paper.num_heads) == (516, 6, 12)
  override = models.create('vit', 10, variant='S/16', depth=3)
  assert (override.width, override.depth) == (384, 3)


def test_create_fails_fast_with_valid_choices():
  with pytest.raises(ValueError,
                     match=r"valid names: \['alternet', 'arvit', 'preresnet', 'resnet', 'vit'\]"):
    models.create('vitt', 10)
  with pytest.raises(ValueError, match=r"Unknown field\(s\) \['widht'\].*'variant'"):
    models.create('vit', 10, variant='Ti/16', widht=3)
  with pytest.raises(ValueError, match='Unknown ViT variant'):
    models.create('vit', 10, variant='Q/16')
  with pytest.raises(ValueError, match='classifier must be one of'):
    models.create('vit', 10, variant='Ti/16', classifier='cls')
  with pytest.raises(ValueError, match='divisible by patch_size'):
    _count(models.create('vit', 10, variant='Ti/16'), (40, 32))
  with pytest.raises(ValueError, match="ARViT variant 'big'"):
    models.create('arvit', 10, variant='big')


@pytest.mark.parametrize('kw,hw', [
    (dict(), (32, 32)),
    (dict(classifier='gap', posemb='sincos2d'), (64, 32)),
    (dict(local_window=3, representation_size=16), (64, 32)),
])
def test_vit_shapes(kw, hw):
  model = models.create('vit', 5, **TINY_VIT, **kw)
  x = _images(hw)
  variables = np_init(model, x, 1)
  logits, out = model.apply(variables, x, capture_attention=(0,))
  gh, gw, prefix = model.token_layout(hw)
  n = gh * gw + prefix
  assert (gh, gw) == (hw[0] // 8, hw[1] // 8)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert out['block0']['attn'].shape == (2, 4, n, n)
  assert out['block1']['input'].shape == out['block1']['output'].shape == (2, n, 32)
  assert out['block1']['head_out'].shape == (2, n, 4, 8)
  assert out['encoded'].shape == (2, n, 32)
  assert out['pre_logits'].shape == (2, kw.get('representation_size', 32))


def test_token_vs_gap():
  x = _images()
  token = models.create('vit', 5, **TINY_VIT)
  gap = models.create('vit', 5, **TINY_VIT, classifier='gap')
  vt, vg = np_init(token, x, 1), np_init(gap, x, 1)
  assert 'cls' in vt['params'] and 'cls' not in vg['params']
  assert vt['params']['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 32)
  assert vg['params']['Transformer']['posembed_input']['pos_embedding'].shape == (1, 16, 32)
  assert token.token_layout((32, 32)) == (4, 4, 1) and gap.token_layout((32, 32)) == (4, 4, 0)
  _, out_t = token.apply(vt, x)
  _, out_g = gap.apply(vg, x)
  np.testing.assert_allclose(out_t['pre_logits'], out_t['encoded'][:, 0], atol=1e-6)
  np.testing.assert_allclose(out_g['pre_logits'], out_g['encoded'].mean(1), atol=1e-6)


def test_sincos_posemb_has_no_parameters_and_depends_on_position():
  model = models.create('vit', 5, **TINY_VIT, posemb='sincos2d', classifier='gap')
  x = jnp.zeros((1, 32, 32, 3))  # identical patches: only the position embedding differs
  variables = np_init(model, x, 1)
  assert 'posembed_input' not in variables['params']['Transformer']
  _, out = model.apply(variables, x)
  assert not np.allclose(out['block0']['input'][0, 0], out['block0']['input'][0, 5])


def test_dropout_and_drop_path_only_in_training():
  model = models.create('vit', 5, **TINY_VIT, dropout=0.1, drop_path=0.5)
  x = _images()
  variables = np_init(model, x, 1)
  eval1, _ = model.apply(variables, x)
  eval2, _ = model.apply(variables, x)
  np.testing.assert_array_equal(eval1, eval2)
  train1, _ = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  train2, _ = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(train1, eval1) and not np.allclose(train1, train2)


def test_last_attn_residual_option():
  """Without the residual, a last block whose heads are all masked forgets its input."""
  x = _images()
  mask = jnp.ones((2, 4)).at[1].set(0.0)
  for residual in (True, False):
    model = models.create('vit', 5, **TINY_VIT, last_attn_residual=residual)
    variables = np_init(model, x, 1)
    _, out = model.apply(variables, x, head_mask=mask)
    last = out['block1']['output']
    constant = np.allclose(last, last[:1, :1], atol=1e-5)
    assert constant == (not residual)


def test_remat_same_parameters_outputs_and_gradients():
  x = _images()
  plain = models.create('vit', 5, **TINY_VIT, local_window=3)
  remat = models.create('vit', 5, **TINY_VIT, local_window=3, remat=True)
  variables = np_init(plain, x, 1)
  shapes = jax.eval_shape(remat.init, jax.random.key(0), x)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  mask = jnp.ones((2, 4)).at[1, 2].set(0.0)

  def loss(model, params):
    logits, _ = model.apply({'params': params}, x, head_mask=mask, capture_attention=(0,),
                            div_layers=(1,))
    return jnp.sum(logits ** 2)

  grads = [jax.jit(jax.value_and_grad(functools.partial(loss, m)))(variables['params'])
           for m in (plain, remat)]
  np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads[0][1], grads[1][1])


def test_bfloat16_compute_float32_params():
  x = _images()
  for name, kw in (('vit', TINY_VIT), ('arvit', TINY_ARVIT)):
    f32 = models.create(name, 5, **kw)
    bf16 = models.create(name, 5, **kw, dtype='bfloat16')
    variables = np_init(f32, x, 1)
    assert all(p.dtype == jnp.float32
               for p in jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.key(1), x)['params']))
    ref, _ = f32.apply(variables, x)
    low, out = bf16.apply(variables, x, capture_attention=True)
    assert low.dtype == jnp.float32 and out['block0']['output'].dtype == jnp.bfloat16
    np.testing.assert_allclose(low, ref, atol=0.1 * float(jnp.abs(ref).max()) + 1e-2)
  with pytest.raises(ValueError, match='Unknown dtype'):
    models.create('vit', 5, **TINY_VIT, dtype='float33')


def test_arvit_paper_and_code_variants():
  x = _images()
  paper = models.create('arvit', 7, **TINY_ARVIT)
  code = models.create('arvit', 7, **TINY_ARVIT, variant='code')
  assert (paper.mlp_dim, paper.posemb_scale, paper.pre_head_norm) == (0, 1.0, False)
  assert (code.mlp_dim, code.posemb_scale, code.pre_head_norm) == (256, 0.3, True)
  assert (code.norm, code.activation, code.posemb, code.posemb_at) == (
      'post', 'relu', 'sincos2d_detr', 'qkv')
  assert (code.dropout, code.attn_dropout) == (0.1, 0.1)
  vp, vc = np_init(paper, x, 1), np_init(code, x, 1)
  mlp_p = vp['params']['Transformer']['encoderblock_0']['MlpBlock_0']
  mlp_c = vc['params']['Transformer']['encoderblock_0']['MlpBlock_0']
  assert list(mlp_p) == ['Dense_0'] and mlp_p['Dense_0']['kernel'].shape == (24, 24)
  assert mlp_c['Dense_0']['kernel'].shape == (24, 256)
  assert 'encoder_norm' not in vp['params']['Transformer']
  assert 'encoder_norm' in vc['params']['Transformer']
  assert 'cls' not in vp['params'] and paper.token_layout((32, 32)) == (4, 4, 0)
  # The head reads the flattened N x D output of the last block.
  assert vp['params']['head']['kernel'].shape == (16 * 24, 7)
  logits, out = paper.apply(vp, x)
  np.testing.assert_allclose(out['pre_logits'], out['block1']['output'].reshape(2, -1))
  np.testing.assert_allclose(
      logits, out['pre_logits'] @ vp['params']['head']['kernel'] + vp['params']['head']['bias'],
      atol=1e-4, rtol=1e-4)
  # posemb_scale scales the fixed embedding (zero image: the block input is the embedding + bias).
  zero = jnp.zeros((1, 32, 32, 3))
  bias = vp['params']['embedding']['bias']
  _, o1 = paper.apply(vp, zero)
  _, o2 = models.create('arvit', 7, **TINY_ARVIT, posemb_scale=0.3).apply(vp, zero)
  np.testing.assert_allclose(o2['block0']['input'] - bias, 0.3 * (o1['block0']['input'] - bias),
                             atol=1e-6)


def test_arvit_code_variant_is_the_authors_encoder():
  # Their similarity model at 256 px, 10 classes (region_similarity_based/ARViT): patch Conv2d
  # 3*16*16*512 + 512 = 393,728; per layer in_proj 3 * 512^2 + 3 * 512 = 787,968, out_proj
  # 262,656, linear1 512 * 256 + 256 = 131,328, linear2 256 * 512 + 512 = 131,584, two
  # LayerNorms 2,048 -> 1,315,584, x 6 = 7,893,504; LayerNorm 1,024; head 256 * 512 * 10 + 10.
  code = models.create('arvit', 10, variant='code')
  assert (code.width, code.num_heads) == (512, 8)
  expected = 393_728 + 6 * 1_315_584 + 1_024 + 256 * 512 * 10 + 10
  assert _count(code, (256, 256)) == expected == 9_598_986
  # The position encoding enters every block's q/k/v, not the tokens: block 0's input is the
  # patch embedding itself.
  tiny = models.create('arvit', 7, **TINY_ARVIT, variant='code')
  x = _images()
  variables = np_init(tiny, x, 1)
  _, out = tiny.apply(variables, x)
  conv = variables['params']['embedding']
  patches = jax.lax.conv_general_dilated(
      jnp.asarray(x), conv['kernel'], (8, 8), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + conv['bias']
  np.testing.assert_allclose(out['block0']['input'], patches.reshape(2, 16, 24), atol=1e-4)
  # Post-norm: every block output is LayerNorm'd (zero mean over channels before the affine).
  ln = variables['params']['Transformer']['encoderblock_0']['LayerNorm_1']
  z = (out['block0']['output'] - ln['bias']) / ln['scale']
  np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-4)
  # Dropout (0.1, incl. the attention probabilities) only while training.
  eval1, _ = tiny.apply(variables, x)
  eval2, _ = tiny.apply(variables, x)
  train, _ = tiny.apply(variables, x, train=True, rngs={'dropout': jax.random.key(0)})
  np.testing.assert_array_equal(eval1, eval2)
  assert not np.allclose(train, eval1, atol=1e-4)


def test_arvit_shares_attention_features():
  model = models.create('arvit', 3, **TINY_ARVIT, local_window=3)
  x = _images((64, 32))
  variables = np_init(model, x, 1)
  mask = jnp.ones((2, 4)).at[0, 1].set(0.0)
  fused, _ = model.apply(variables, x, head_mask=mask, div_layers=(1,))
  explicit, out = model.apply(variables, x, head_mask=mask, capture_attention=True)
  np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=1e-5)
  assert out['block0']['attn'].shape == (2, 4, 32, 32)
  np.testing.assert_array_equal(out['block0']['head_out'][:, :, 1], 0.0)


@pytest.mark.parametrize('depth,stem,hw', [(18, 'cifar', (32, 32)), (50, 'imagenet', (64, 64)),
                                           (18, 'cifar', (64, 32))])
def test_resnet_shapes_and_batch_stats(depth, stem, hw):
  model = models.create('resnet', 4, depth=depth, stem=stem, width=8)
  x = _images(hw)
  variables = np_init(model, x, 1)
  assert 'batch_stats' in variables
  logits, out = model.apply(variables, x)
  assert logits.shape == (2, 4)
  expansion = 4 if depth == 50 else 1
  down = 1 if stem == 'cifar' else 4
  for s in range(1, 5):
    scale = down * 2**(s - 1)
    assert out[f'stage{s}'].shape == (2, hw[0] // scale, hw[1] // scale, 8 * 2**(s - 1) * expansion)
  assert len([k for k in out if k.startswith('block')]) == (8 if depth == 18 else 16)
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables['batch_stats'],
                         state['batch_stats'])
  assert all(jax.tree.leaves(changed))
  with pytest.raises(ValueError, match='head_mask must be None'):
    model.apply(variables, x, head_mask=jnp.ones((8, 1)))


def test_alternet_layout_rule():
  assert alternet.alternet_layout((3, 4, 6, 4), (0, 1, 3, 2)) == [
      ['conv'] * 3, ['conv'] * 3 + ['msa'], ['conv', 'msa'] * 3, ['conv', 'msa'] * 2]
  assert alternet.alternet_layout((5,), (1,)) == [['conv'] * 4 + ['msa']]
  assert alternet.alternet_layout((5,), (2,)) == [['conv', 'conv', 'msa', 'conv', 'msa']]
  with pytest.raises(ValueError, match='0..2 alternating MSA'):
    alternet.alternet_layout((4,), (3,))
  default = models.create('alternet', 100)
  assert ''.join(k[0] for k in default.block_kinds()) == 'ccc' 'cccm' 'cmcmcm' 'cmcm'


def test_alternet_shapes():
  model = models.create('alternet', 6, width=8, blocks_per_stage=(1, 2, 2, 2),
                        msa_per_stage=(0, 1, 1, 1), heads=(1, 2, 2, 4), head_dim=8,
                        msa_window=4)
  x = _images((32, 32))
  variables = np_init(model, x, 1)
  msa = variables['params']['stage2_block1']
  assert msa['attention']['query']['kernel'].shape == (16, 2, 8)   # f = 16 -> 2 heads x 8
  assert 'bias' not in msa['attention']['query']                   # to_q / to_kv: bias=False
  assert msa['attention']['out']['kernel'].shape == (2, 8, 64)     # projects to 4 f
  assert msa['relative_position_bias'].shape == (7, 7)             # 2 w - 1
  logits, out = model.apply(variables, x)
  assert logits.shape == (2, 6)
  assert out['block2']['output'].shape == (2, 16, 16, 64)
  assert out['stage4'].shape == (2, 4, 4, 256)
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert set(state) == {'batch_stats'}
  with pytest.raises(ValueError, match='capture_attention'):
    model.apply(variables, x, capture_attention=True)


def test_alternet_figure_msa_windows():
  """A window covering the whole map is global attention; smaller windows are not."""
  x = _images((4, 4), batch=1)
  x = np.concatenate([x] * 4, axis=-1)  # 12 channels
  blocks = {w: alternet.FigureMSABlock(4, num_heads=2, head_dim=4, window=w)
            for w in (None, 4, 2)}
  variables = np_init(blocks[None], x, 1)
  y = {w: b.apply(variables, x) for w, b in blocks.items()}
  np.testing.assert_allclose(y[4], y[None], atol=1e-5)
  assert not np.allclose(y[2], y[None], atol=1e-3)
  # Window 2: the top-left 2x2 window's output only depends on its own positions.
  x2 = x.copy()
  x2[:, 2:, 2:] += 1.0
  y2 = blocks[2].apply(variables, x2)
  np.testing.assert_allclose(y2[:, :2, :2], y[2][:, :2, :2], atol=1e-5)
  with pytest.raises(ValueError, match='must divide'):
    alternet.FigureMSABlock(4, num_heads=2, head_dim=4, window=3).apply(variables, x)
  figure = models.create('alternet', 6, msa_block='figure', width=8, blocks_per_stage=(1, 2),
                         msa_per_stage=(0, 1), heads=(1, 2))
  assert 'relative_position_bias' not in np_init(figure, _images((8, 8)), 1)['params'][
      'stage2_block1']


def test_relative_position_index_matches_definition():
  w = 3
  index = alternet.relative_position_index(w)
  assert index.shape == (w * w, w * w, 2)
  for a, b in itertools.product(range(w * w), repeat=2):
    (ra, ca), (rb, cb) = divmod(a, w), divmod(b, w)
    assert tuple(index[a, b]) == (rb - ra + w - 1, cb - ca + w - 1)


def test_alternet_authors_block_window_and_relative_bias():
  """Tokens see only their own window; the bias table is indexed by relative offset."""
  x = np.concatenate([_images((4, 4), batch=1)] * 4, axis=-1)  # 12 channels -> 16 out
  block = alternet.MSABlock(4, num_heads=2, head_dim=4, window=2)
  variables = np_init(block, x, 1)
  params = variables['params']
  assert params['relative_position_bias'].shape == (3, 3)
  assert 'bias' not in params['attention']['key']
  y = block.apply(variables, x)
  assert y.shape == (1, 4, 4, 16)
  x2 = x.copy()
  x2[:, 2:, 2:] += 1.0   # another window
  np.testing.assert_allclose(block.apply(variables, x2)[:, :2, :2], y[:, :2, :2], atol=1e-5)
  x3 = x.copy()
  x3[:, 0, 1] += 1.0     # same window, another token
  assert not np.allclose(block.apply(variables, x3)[:, 0, 0], y[:, 0, 0], atol=1e-4)
  # A table that forbids every offset but (0, 0): each token attends to itself only, so the
  # other token of its window no longer matters. A wrongly indexed table would fail this.
  table = np.full((3, 3), -1e9, np.float32)
  table[1, 1] = 0.0
  selfish = {**variables, 'params': {**params, 'relative_position_bias': table}}
  np.testing.assert_allclose(block.apply(selfish, x3)[:, 0, 0], block.apply(selfish, x)[:, 0, 0],
                             atol=1e-5)
  with pytest.raises(ValueError, match='must divide'):
    alternet.MSABlock(4, num_heads=2, head_dim=4, window=3).apply(variables, x)
