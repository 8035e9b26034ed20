"""Tests of vitreg_jax.models.attention: masks, head masks, fused vs explicit, per-head inputs."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from testutil import np_init
from vitreg_jax.models import attention
from vitreg_jax.models import encoder
from vitreg_jax.models.vit import ViT

B, N, D, H = 2, 7, 24, 4
DH = D // H



def _normal(shape, seed=0):
  return np.random.RandomState(seed).normal(size=shape).astype(np.float32)


def _tiny_vit(**kw):
  args = dict(num_classes=5, width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=8,
              head_zeroinit=False)
  args.update(kw)
  return ViT(**args)


def _mha_params(num_heads=H, seed=0):
  x = _normal((B, N, D), seed)
  mha = attention.MultiHeadAttention(num_heads)
  # np_init gives random biases too, so slicing them matters.
  return mha, np_init(mha, x, seed + 1)['params'], x


def _slow_attention(params, xs, mask=None, head_mask=None):
  """Obviously-correct reference: a Python loop over heads (xs: one [B, N, D] input per head)."""
  num_heads = len(xs)
  kept = num_heads if head_mask is None else float(np.sum(head_mask))
  y = params['out']['bias']
  for h in range(num_heads):
    proj = lambda name: xs[h] @ params[name]['kernel'][:, h] + params[name]['bias'][h]
    q, k, v = proj('query'), proj('key'), proj('value')
    logits = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
      logits = jnp.where(mask, logits, -1e30)
    z = jax.nn.softmax(logits, axis=-1) @ v
    if head_mask is not None:
      z = z * head_mask[h] * num_heads / kept
    y = y + z @ params['out']['kernel'][h]
  return y


def _brute_force_window(gh, gw, k, prefix):
  n = prefix + gh * gw
  mask = np.ones((n, n), bool)
  for i, j in itertools.product(range(gh * gw), repeat=2):
    (ri, ci), (rj, cj) = divmod(i, gw), divmod(j, gw)
    ok = True
    for p, q, g in ((ri, rj, gh), (ci, cj, gw)):
      kk = min(k, g)
      start = min(max(p - kk // 2, 0), g - kk)
      ok &= start <= q < start + kk
    mask[prefix + i, prefix + j] = ok
  return mask


@pytest.mark.parametrize('gh,gw,k,prefix', [(8, 8, 3, 1), (8, 8, 5, 0), (8, 8, 8, 1),
                                            (8, 4, 4, 1), (5, 7, 2, 0)])
def test_local_mask_matches_definition(gh, gw, k, prefix):
  mask = attention.local_attention_mask((gh, gw), k, prefix)
  np.testing.assert_array_equal(mask, _brute_force_window(gh, gw, k, prefix))
  # Every patch token sees exactly min(k, gh) * min(k, gw) patches plus the prefix tokens.
  np.testing.assert_array_equal(mask[prefix:].sum(1), prefix + min(k, gh) * min(k, gw))
  assert mask[:prefix].all() and mask[:, :prefix].all()


def test_local_mask_window_is_centred_and_global_when_large():
  mask = attention.local_attention_mask((8, 8), 3, 0).reshape(8, 8, 8, 8)
  # Interior token (4, 4) sees rows/cols 3..5 only.
  seen = np.argwhere(mask[4, 4])
  assert seen.min(0).tolist() == [3, 3] and seen.max(0).tolist() == [5, 5]
  assert attention.local_attention_mask((8, 8), 8, 1).all()
  with pytest.raises(ValueError, match='local_window'):
    attention.local_attention_mask((8, 8), 0)


@pytest.mark.parametrize('explicit', [False, True])
@pytest.mark.parametrize('windowed', [False, True])
def test_attention_matches_slow_reference(explicit, windowed):
  mha, params, x = _mha_params()
  mask = np.tril(np.ones((N, N), bool)) if windowed else None
  head_mask = jnp.array([1.0, 0.0, 0.5, 1.0])
  y, aux = mha.apply({'params': params}, x, mask=mask, head_mask=head_mask, explicit=explicit)
  ref = _slow_attention(params, [x] * H, mask=mask, head_mask=head_mask)
  np.testing.assert_allclose(y, ref, atol=2e-5, rtol=2e-5)
  assert aux['head_out'].shape == (B, N, H, DH)
  assert ('attn' in aux) == explicit


@pytest.mark.parametrize('explicit', [False, True])
@pytest.mark.parametrize('per_head_inputs', [False, True])
def test_masked_head_equals_removed_head(explicit, per_head_inputs):
  """Masking head h == an (H-1)-head layer with h's weights removed, rescaled by H / (H-1)."""
  mha, params, x = _mha_params()
  drop = 2
  keep = np.array([h for h in range(H) if h != drop])
  small = attention.MultiHeadAttention(H - 1, qkv_features=(H - 1) * DH)
  sliced = {n: {'kernel': params[n]['kernel'][:, keep], 'bias': params[n]['bias'][keep]}
            for n in ('query', 'key', 'value')}
  sliced['out'] = {'kernel': params['out']['kernel'][keep] * H / (H - 1),
                   'bias': params['out']['bias']}
  mask = attention.local_attention_mask((2, 3), 2, 1)
  xin = jnp.broadcast_to(x[:, None], (B, H, N, D)) if per_head_inputs else x
  head_mask = jnp.ones(H).at[drop].set(0.0)
  y, aux = mha.apply({'params': params}, xin, mask=mask, head_mask=head_mask,
                     explicit=explicit, per_head_inputs=per_head_inputs)
  xs = xin[:, keep] if per_head_inputs else x
  y_small, _ = small.apply({'params': sliced}, xs, mask=mask, explicit=explicit,
                           per_head_inputs=per_head_inputs)
  np.testing.assert_allclose(y, y_small, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(aux['head_out'][:, :, drop], 0.0)


def test_head_mask_all_zero_is_finite():
  mha, params, x = _mha_params()
  grad = jax.grad(lambda m: mha.apply({'params': params}, x, head_mask=m)[0].sum())(jnp.zeros(H))
  assert np.all(np.isfinite(grad))
  y, _ = mha.apply({'params': params}, x, head_mask=jnp.zeros(H))
  np.testing.assert_allclose(y, jnp.broadcast_to(params['out']['bias'], y.shape), atol=1e-6)


def test_per_head_input_gradients_match_loop():
  """Gradient w.r.t. per-head inputs equals a per-head loop reference (the DIV gradients)."""
  mha, params, x = _mha_params()
  xh = jnp.broadcast_to(x[:, None], (B, H, N, D))
  w = _normal((B, N, D), 7)

  def fast(xh):
    y, _ = mha.apply({'params': params}, xh, per_head_inputs=True)
    return jnp.sum(jnp.tanh(y) * w)

  def slow(*xs):
    return jnp.sum(jnp.tanh(_slow_attention(params, list(xs))) * w)

  g_fast = jax.jit(jax.grad(fast))(xh)
  g_slow = jax.jit(jax.grad(slow, argnums=tuple(range(H))))(*[x] * H)
  for h in range(H):
    np.testing.assert_allclose(g_fast[:, h], g_slow[h], atol=1e-5, rtol=1e-4)
  # Different heads see different gradients (the quantity DIV decorrelates).
  assert not np.allclose(g_fast[:, 0], g_fast[:, 1], atol=1e-4)


@pytest.mark.parametrize('kw', [dict(), dict(local_window=3), dict(classifier='gap'),
                                dict(posemb='sincos2d', local_window=2)])
def test_vit_fused_matches_explicit(kw):
  model = _tiny_vit(**kw)
  x = _normal((2, 32, 32, 3))
  variables = np_init(model, x, 1)
  fused, _ = model.apply(variables, x)
  explicit, out = model.apply(variables, x, capture_attention=True)
  np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=1e-5)
  partial, out_p = model.apply(variables, x, capture_attention=(1,))
  np.testing.assert_allclose(fused, partial, atol=1e-5, rtol=1e-5)
  n = 16 + (model.classifier == 'token')
  assert 'attn' not in out_p['block0'] and out_p['block1']['attn'].shape == (2, 4, n, n)
  np.testing.assert_allclose(out['block0']['attn'].sum(-1), 1.0, atol=1e-5)


def test_local_attention_token_cannot_see_outside_window():
  model = _tiny_vit(local_window=3)  # 4 x 4 grid + CLS
  x = _normal((2, 32, 32, 3))
  variables = np_init(model, x, 1)
  _, out = model.apply(variables, x, capture_attention=True)
  allowed = attention.local_attention_mask((4, 4), 3, 1)
  attn = np.asarray(out['block1']['attn'])
  assert np.all(attn[..., ~allowed] == 0.0)
  assert np.all(attn[..., allowed] > 0.0)
  # Changing a patch outside token t's window leaves t's first-block attention output unchanged
  # (block 0, as deeper blocks mix information through CLS).
  far = jnp.asarray(x).at[:, 24:, 24:].add(5.0)  # patch (3, 3); token (0, 0) sees rows/cols 0..2
  _, out_far = model.apply(variables, far)
  np.testing.assert_allclose(out['block0']['head_out'][:, 1], out_far['block0']['head_out'][:, 1],
                             atol=1e-6)
  assert not np.allclose(out['block0']['head_out'][:, 16], out_far['block0']['head_out'][:, 16])


def test_vit_div_layers_identity_and_gradients():
  model = _tiny_vit()
  x = _normal((2, 32, 32, 3))
  variables = np_init(model, x, 1)
  plain, _ = model.apply(variables, x)
  div, _ = model.apply(variables, x, div_layers=(0, 1))
  np.testing.assert_allclose(plain, div, atol=1e-5, rtol=1e-5)
  # Zero perturbations created by a mutable apply, at the documented path and shape.
  pert = jax.eval_shape(functools.partial(model.apply, div_layers=(1,),
                                          mutable=['perturbations']), variables, x)[1]
  pert = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), pert['perturbations'])
  assert pert['Transformer']['encoderblock_1'][attention.PERTURBATION_NAME].shape == (2, 4, 17,
                                                                                     32)

  def loss(params, pert, div_layers):
    logits, _ = model.apply({'params': params, 'perturbations': pert}, x, div_layers=div_layers)
    return jax.nn.log_softmax(logits)[:, 0].sum()

  # jit: one compilation instead of op-by-op dispatch of the backward pass.
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  g_params, g_pert = grad(variables['params'], pert, (1,))
  g = g_pert['Transformer']['encoderblock_1'][attention.PERTURBATION_NAME]
  # LayerNorm_0's bias is added to the normalized input, so its gradient is the sum of the
  # per-head input gradients over batch, tokens and heads.
  ln_bias_grad = g_params['Transformer']['encoderblock_1']['LayerNorm_0']['bias']
  np.testing.assert_allclose(g.sum(axis=(0, 1, 2)), ln_bias_grad, atol=1e-5, rtol=1e-4)
  g_plain, _ = grad(variables['params'], {}, ())
  np.testing.assert_allclose(
      g_plain['Transformer']['encoderblock_1']['LayerNorm_0']['bias'], ln_bias_grad, atol=1e-5,
      rtol=1e-4)


def test_vit_head_mask_per_example_and_layer():
  model = _tiny_vit()
  x = _normal((2, 32, 32, 3))
  variables = np_init(model, x, 1)
  ones, _ = model.apply(variables, x, head_mask=jnp.ones((2, 4)))
  plain, _ = model.apply(variables, x)
  np.testing.assert_allclose(ones, plain, atol=1e-6)
  m0 = jnp.array([[1., 0., 1., 1.], [1., 1., 1., 1.]])
  m1 = jnp.array([[1., 1., 1., 1.], [0., 0., 1., 0.]])
  y0, out0 = model.apply(variables, x, head_mask=m0, capture_attention=True)
  y1, _ = model.apply(variables, x, head_mask=m1)
  both, _ = model.apply(variables, x, head_mask=jnp.stack([m0, m1]))
  np.testing.assert_allclose(both[0], y0[0], atol=1e-5)
  np.testing.assert_allclose(both[1], y1[1], atol=1e-5)
  assert not np.allclose(y0, plain, atol=1e-4)
  np.testing.assert_array_equal(out0['block0']['head_out'][:, :, 1], 0.0)
  with pytest.raises(ValueError, match=r'head_mask must have shape \[depth, heads\]'):
    model.apply(variables, x, head_mask=jnp.ones((4, 2)))


@pytest.mark.parametrize('name', ['vit', 'arvit'])
def test_expanded_masks_equal_one_call_per_mask(name):
  """`expand_masks_at=l`: row c * B + b is image b under mask c, for every l in [0, depth]."""
  from vitreg_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create(name, 5, width=16, depth=3, mlp_dim=16, num_heads=4, patch_size=8)
  x = _normal((3, 32, 32, 3))
  variables = np_init(model, x, 1)
  masks = np.ones((3, 3, 4), np.float32)
  masks[1, 2] = [1, 0, 0, 0]  # Differ only in the last block.
  masks[2, 2] = [0, 1, 1, 1]
  expected = np.concatenate([model.apply(variables, x, head_mask=m)[0] for m in masks])
  for at in (0, 2, 3):
    masks_at = masks.copy()
    masks_at[:, :at] = masks[0, :at]
    if at < 2:  # Masks may also differ in the blocks from `at` on.
      masks_at[1, at] = [0, 0, 1, 1]
    want = np.concatenate([model.apply(variables, x, head_mask=m)[0] for m in masks_at])
    got, _ = model.apply(variables, x, head_mask=masks_at, expand_masks_at=at)
    assert got.shape == (9, 5)
    np.testing.assert_allclose(got, want, atol=2e-5)
  assert not np.allclose(expected[:3], expected[3:6], atol=1e-4)
  with pytest.raises(ValueError, match=r'expand_masks_at must be a block index in \[0, 3\]'):
    model.apply(variables, x, head_mask=masks, expand_masks_at=4)
  with pytest.raises(ValueError, match=r'needs head_mask of shape \[C, depth, heads\]'):
    model.apply(variables, x, head_mask=masks[0], expand_masks_at=0)


def test_bad_layer_indices_fail_fast():
  model = _tiny_vit()
  x = jnp.zeros((1, 32, 32, 3))
  variables = np_init(model, x, 1)
  with pytest.raises(ValueError, match='outside'):
    model.apply(variables, x, capture_attention=(2,))
  with pytest.raises(ValueError, match='div_layers'):
    model.apply(variables, x, div_layers=(-1,))


def test_sincos_posemb_values():
  pe = attention.posemb_sincos_2d((2, 3), 8)[0]
  # Token (row 1, col 2): x = 2, y = 1; frequencies 1 and 1e-4.
  omega = np.array([1.0, 1e-4])
  expected = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)])
  np.testing.assert_allclose(pe[5], expected, rtol=1e-6)
  with pytest.raises(ValueError, match='divisible by 4'):
    attention.posemb_sincos_2d((2, 2), 6)


def test_head_masks_share_one_compilation():
  """Head selection evaluates many masks: they are array arguments, not recompilations."""
  model = _tiny_vit()
  x = _normal((2, 32, 32, 3))
  variables = np_init(model, x, 1)
  fwd = jax.jit(lambda v, x, m: model.apply(v, x, head_mask=m)[0])
  a = fwd(variables, x, jnp.ones((2, 4)))
  b = fwd(variables, x, jnp.ones((2, 4)).at[0, 2].set(0.0))
  assert fwd._cache_size() == 1
  assert not np.allclose(a, b)


# ------------------------------------------- head size, q/k/v bias, logit bias, per-block pos


def _reference_mha(params, xs, bias=None, head_mask=None, qk_pos=0.0, v_pos=0.0):
  """Loop over heads with optional q/k/v biases, logit bias [H, N, N] and position inputs."""
  num_heads = len(xs)
  kept = num_heads if head_mask is None else float(np.sum(head_mask))
  y = params['out']['bias']
  for h in range(num_heads):
    def proj(name, x):
      p = params[name]
      return x @ p['kernel'][:, h] + (p['bias'][h] if 'bias' in p else 0.0)
    q, k = proj('query', xs[h] + qk_pos), proj('key', xs[h] + qk_pos)
    v = proj('value', xs[h] + v_pos)
    logits = q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if bias is not None:
      logits = logits + bias[h]
    z = jax.nn.softmax(logits, axis=-1) @ v
    if head_mask is not None:
      z = z * head_mask[h] * num_heads / kept
    y = y + z @ params['out']['kernel'][h]
  return y


@pytest.mark.parametrize('explicit', [False, True])
@pytest.mark.parametrize('per_head_inputs', [False, True])
def test_inner_width_differs_from_residual_width(explicit, per_head_inputs):
  """H * Dh = 4 * 16 = 64 != D = 24, no q/k/v bias (the DIV authors' attention), head mask."""
  x = _normal((B, N, D))
  mha = attention.MultiHeadAttention(H, qkv_features=H * 16, use_bias=False)
  params = np_init(mha, x, 3)['params']
  assert params['query']['kernel'].shape == (D, H, 16) and 'bias' not in params['query']
  assert params['out']['kernel'].shape == (H, 16, D)
  xin = jnp.broadcast_to(x[:, None], (B, H, N, D)) if per_head_inputs else x
  head_mask = np.array([1.0, 1.0, 0.0, 1.0])
  y, aux = mha.apply({'params': params}, xin, head_mask=head_mask, explicit=explicit,
                     per_head_inputs=per_head_inputs)
  assert y.shape == (B, N, D) and aux['head_out'].shape == (B, N, H, 16)
  np.testing.assert_allclose(y, _reference_mha(params, [x] * H, head_mask=head_mask),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('explicit', [False, True])
def test_logit_bias_and_position_inputs_match_reference(explicit):
  """Additive [H, N, N] logit bias; position added to q/k inputs and (separately) to v."""
  mha, params, x = _mha_params()
  bias = _normal((H, N, N), 5)
  qk_pos, v_pos = _normal((N, D), 6), _normal((N, D), 7)
  y, _ = mha.apply({'params': params}, x, bias=bias, explicit=explicit, qk_pos=qk_pos,
                   v_pos=v_pos)
  np.testing.assert_allclose(
      y, _reference_mha(params, [x] * H, bias=bias, qk_pos=qk_pos, v_pos=v_pos),
      atol=1e-5, rtol=1e-5)
  y2, _ = mha.apply({'params': params}, x, bias=bias[0], explicit=explicit)  # [N, N] shared
  np.testing.assert_allclose(y2, _reference_mha(params, [x] * H, bias=[bias[0]] * H),
                             atol=1e-5, rtol=1e-5)


def test_attention_dropout_only_while_training():
  mha, params, x = _mha_params()
  mha = attention.MultiHeadAttention(H, attn_dropout=0.5)
  y_eval, _ = mha.apply({'params': params}, x)
  np.testing.assert_allclose(y_eval, _reference_mha(params, [x] * H), atol=1e-5, rtol=1e-5)
  y_train, aux = mha.apply({'params': params}, x, train=True, explicit=True,
                           rngs={'dropout': jax.random.key(0)})
  assert not np.allclose(y_train, y_eval, atol=1e-3)
  np.testing.assert_allclose(aux['attn'].sum(-1), 1.0, rtol=1e-5)  # maps before dropout


def test_vit_head_dim_keeps_div_inputs_and_head_masks():
  """A ViT whose heads are wider than width / heads: per-head DIV gradients and head masks."""
  from vitreg_jax import regularizers  # pylint: disable=g-import-not-at-top
  model = _tiny_vit(width=16, num_heads=2, head_dim=12, qkv_bias=False, depth=2, mlp_dim=8)
  x = _normal((2, 32, 32, 3))
  variables = np_init(model, x, 1)
  block = variables['params']['Transformer']['encoderblock_1']
  assert block['MultiHeadDotProductAttention_0']['value']['kernel'].shape == (16, 2, 12)
  grads, logits, out, _ = regularizers.div_head_input_grads(model, variables, x, div_layers=(1,))
  assert grads[1].shape == (2, 2, 17, 16) and out['block1']['head_out'].shape == (2, 17, 2, 12)
  assert not np.allclose(grads[1][:, 0], grads[1][:, 1], atol=1e-5)
  # Masking head 0 of the DIV block cuts the prediction's dependence through it.
  mask = np.ones((2, 2), np.float32)
  mask[1, 0] = 0.0
  masked, *_ = regularizers.div_head_input_grads(model, variables, x, div_layers=(1,),
                                                 head_mask=mask)
  np.testing.assert_array_equal(masked[1][:, 0], 0.0)
  assert np.abs(masked[1][:, 1]).max() > 0


def test_sincos_detr_layout_matches_the_authors_formula():
  """Channel by channel, the ARViT authors' positionalencoding2d (models/positional_encoding.py)."""
  gh, gw, width = 3, 5, 16
  pe = attention.posemb_sincos_2d_detr((gh, gw), width)[0]
  half = width // 2
  for r, c in itertools.product(range(gh), range(gw)):
    for j in range(0, half, 2):
      w = np.exp(j * -(np.log(10000.0) / half))
      row = pe[r * gw + c]
      np.testing.assert_allclose(row[[j, j + 1, half + j, half + j + 1]],
                                 [np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w)],
                                 atol=1e-6)


def test_post_norm_block_matches_reference():
  """`norm='post'`, ReLU FFN, position on q/k/v inputs: LN(x + Attn), then LN(x + FFN)."""
  x = _normal((B, N, D))
  pos = _normal((N, D), 9)
  block = encoder.EncoderBlock(H, 16, norm='post', activation='relu')
  params = np_init(block, x, 4, pos=pos, pos_to_values=True)['params']
  y, out = block.apply({'params': params}, x, pos=pos, pos_to_values=True)

  def ln(z, p):
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']

  mlp = params['MlpBlock_0']
  h = ln(x + _reference_mha(params['MultiHeadDotProductAttention_0'], [x] * H, qk_pos=pos,
                            v_pos=pos), params['LayerNorm_0'])
  f = np.maximum(h @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'], 0)
  f = f @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
  np.testing.assert_allclose(y, ln(h + f, params['LayerNorm_1']), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(out['input'], x)
