"""Tests for vitreg_jax.regularizers against slow, obviously-correct references.

The maths is checked on a tiny stand-in ViT defined here (`TinyViT`, honouring the model
contract of docs/design.md: capture_attention, div_layers with self.perturb('head_inputs'),
head_mask, token_layout) whose forward pass is re-implemented by hand (`ref_forward`) so
that per-head gradients can be taken one head at a time with the other heads' paths under
stop_gradient. Tests with the library's own ViT sit at the end of the file.
"""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import errors
from vitreg_jax import regularizers as R
from vitreg_jax.regularizers import div

# --------------------------------------------------------------------------------------
# A tiny stand-in ViT (test-only) and its hand-written reference forward pass.
# --------------------------------------------------------------------------------------


class TinyBlock(nn.Module):
  width: int
  num_heads: int

  @nn.compact
  def __call__(self, x, mask, explicit, div):
    b, n, d = x.shape
    h, hd = self.num_heads, self.width // self.num_heads
    blk = {'input': x}
    y = nn.LayerNorm(name='ln1')(x)
    init = nn.initializers.normal(0.5)
    wq = self.param('wq', init, (d, h, hd))
    wk = self.param('wk', init, (d, h, hd))
    wv = self.param('wv', init, (d, h, hd))
    if div:
      yh = self.perturb('head_inputs', jnp.broadcast_to(y[:, None], (b, h, n, d)))
      proj = lambda w: jnp.einsum('bhnd,dhe->bhne', yh, w)
    else:
      proj = lambda w: jnp.einsum('bnd,dhe->bhne', y, w)
    q, k, v = proj(wq), proj(wk), proj(wv)
    a = jax.nn.softmax(jnp.einsum('bhqe,bhke->bhqk', q, k) / math.sqrt(hd), axis=-1)
    if explicit:
      blk['attn'] = a
    o = jnp.einsum('bhqk,bhke->bqhe', a, v)
    if mask is not None:
      o = o * mask[None, None, :, None] * (h / jnp.maximum(jnp.sum(mask), 1e-6))
    blk['head_out'] = o
    x = x + nn.Dense(d, name='proj')(o.reshape(b, n, h * hd))
    z = nn.Dense(d, name='fc2')(nn.gelu(nn.Dense(2 * d, name='fc1')(
        nn.LayerNorm(name='ln2')(x))))
    x = x + z
    blk['output'] = x
    return x, blk


class TinyViT(nn.Module):
  num_classes: int = 3
  depth: int = 2
  num_heads: int = 4
  width: int = 16
  patch: int = 4
  use_bn: bool = False

  def token_layout(self, image_hw):
    return image_hw[0] // self.patch, image_hw[1] // self.patch, 1

  @nn.compact
  def __call__(self, images, *, head_mask=None, train=False, capture_attention=False,
               div_layers=()):
    b, hh, ww, c = images.shape
    gh, gw, _ = self.token_layout((hh, ww))
    p = self.patch
    x = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(self.width, name='embed')(x.reshape(b, gh * gw, p * p * c))
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    cls = self.param('cls', nn.initializers.normal(1.0), (1, 1, self.width))
    pos = self.param('pos', nn.initializers.normal(0.5), (1, gh * gw + 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1) + pos
    out = {}
    for i in range(self.depth):
      explicit = capture_attention is True or (
          not isinstance(capture_attention, bool) and i in capture_attention)
      x, out[f'block{i}'] = TinyBlock(self.width, self.num_heads, name=f'block{i}')(
          x, None if head_mask is None else head_mask[i], explicit, i in div_layers)
    x = nn.LayerNorm(name='norm')(x)
    out['encoded'] = x
    logits = nn.Dense(self.num_classes, name='head')(x[:, 0])
    out['logits'] = logits
    return logits, out


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _dense(x, p):
  return x @ p['kernel'] + p['bias']


def ref_forward(params, images, *, head_mask=None, layer=None, delta=None, only_head=None,
                patch=4, num_heads=4):
  """Hand-written TinyViT forward. At block `layer`, head `only_head` sees LN(x) + delta,
  every other head LN(x) + stop_gradient(delta)."""
  b, hh, ww, c = images.shape
  gh, gw = hh // patch, ww // patch
  x = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = _dense(x.reshape(b, gh * gw, -1), params['embed'])
  cls = jnp.broadcast_to(params['cls'], (b, 1, x.shape[-1]))
  x = jnp.concatenate([cls, x], axis=1) + params['pos']
  depth = sum(1 for k in params if k.startswith('block'))
  for i in range(depth):
    p = params[f'block{i}']
    y = _ln(x, p['ln1'])
    inputs = [y] * num_heads
    if i == layer:
      # Only delta is cut for the other heads: cutting y too would also remove the
      # dependence of g_h on the earlier parameters through the other heads' outputs,
      # which the double backprop must keep (the authors' gradient-hook version keeps it).
      # only_head may be traced (vmapped over heads): where() picks the same value either
      # way, but only the head equal to only_head passes delta's gradient.
      inputs = [y + jnp.where(h == only_head, delta, jax.lax.stop_gradient(delta))
                for h in range(num_heads)]
    yh = jnp.stack(inputs, axis=1)  # [B, H, N, D]
    q, k, v = (jnp.einsum('bhnd,dhe->bhne', yh, p[w]) for w in ('wq', 'wk', 'wv'))
    a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]), axis=-1)
    o = a @ v  # [B, H, N, Dh]
    if head_mask is not None:
      scale = head_mask[i] * num_heads / jnp.maximum(jnp.sum(head_mask[i]), 1e-6)
      o = o * scale[None, :, None, None]
    o = jnp.transpose(o, (0, 2, 1, 3)).reshape(b, o.shape[2], -1)
    x = x + _dense(o, p['proj'])
    x = x + _dense(nn.gelu(_dense(_ln(x, p['ln2']), p['fc1'])), p['fc2'])
  x = _ln(x, params['norm'])
  return _dense(x[:, 0], params['head'])


def loop_head_grads(params, images, layer, *, target='max_logit', labels=None,
                    head_mask=None, num_heads=4):
  """Slow reference: one jax.grad per head, the other heads' paths under stop_gradient.

  The heads are a jax.vmap over the index h, not a Python loop: the same H separate
  gradients, but XLA compiles one copy of the (double) backward pass instead of H."""
  b = images.shape[0]
  n = (images.shape[1] // 4) * (images.shape[2] // 4) + 1
  d = params['embed']['kernel'].shape[1]

  def head_grad(h):
    def p_star(delta):
      logits = ref_forward(params, images, head_mask=head_mask, layer=layer, delta=delta,
                           only_head=h)
      return jnp.sum(R.prediction_target(logits, target, labels))
    return jax.grad(p_star)(jnp.zeros((b, n, d)))

  return jax.vmap(head_grad, out_axes=1)(jnp.arange(num_heads))  # [B, H, N, D]


def loop_div_loss(g, normalize=False, reduction='sum'):
  """L_IG with explicit loops over head pairs (jnp so that it can be differentiated)."""
  b, h, n, _ = g.shape
  if normalize:
    g = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
  total = 0.0
  for i, j in itertools.product(range(h), range(h)):
    if i != j:
      total = total + jnp.sum(jnp.sum(g[:, i] * g[:, j], axis=-1) ** 2, axis=1) / n
  total = total / (h * h if reduction == 'mean' else 1)
  return jnp.mean(total)


@pytest.fixture(scope='module')
def tiny():
  model = TinyViT()
  images = jax.random.normal(jax.random.key(0), (3, 8, 12, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  labels = jnp.array([0, 2, 1])
  return model, variables, images, labels


# --------------------------------------------------------------------------------------
# DIV.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize('normalize,reduction', [(False, 'sum'), (True, 'sum'),
                                                 (True, 'mean')])
def test_div_loss_matches_numpy_loops(normalize, reduction):
  g = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
  g[1, 2] = 0.0  # a masked head: no NaN
  expected = 0.0
  gn = g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12) if normalize else g
  for b in range(2):
    per_example = 0.0
    for i in range(3):
      for j in range(3):
        if i != j:
          per_example += sum(float(gn[b, i, n] @ gn[b, j, n]) ** 2 for n in range(5))
    per_example /= 5 * (9 if reduction == 'mean' else 1)
    expected += per_example / 2
  got = R.div_loss(jnp.asarray(g), normalize=normalize, reduction=reduction)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_prediction_targets():
  logits = jnp.array([[1.0, 3.0, 2.0], [0.5, -1.0, 0.0]])
  np.testing.assert_allclose(R.prediction_target(logits), [3.0, 0.5])
  np.testing.assert_allclose(R.prediction_target(logits, 'max_prob'),
                             jax.nn.softmax(logits).max(-1), rtol=1e-6)
  np.testing.assert_allclose(R.prediction_target(logits, 'label_logit', jnp.array([2, 1])),
                             [2.0, -1.0])
  grad = jax.grad(lambda z: R.prediction_target(z).sum())(logits)
  np.testing.assert_array_equal(grad, [[0, 1, 0], [1, 0, 0]])


def test_div_loss_bf16_accumulates_in_fp32():
  g = jax.random.normal(jax.random.key(0), (2, 4, 16, 8))
  got, ref = jax.jit(lambda g: (R.div_loss(g.astype(jnp.bfloat16)), R.div_loss(
      g.astype(jnp.bfloat16).astype(jnp.float32))))(g)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_stand_in_matches_reference_forward(tiny):
  model, variables, images, _ = tiny
  mask = jnp.array([[1., 0., 1., 1.], [0.5, 1., 1., 0.]])
  logits, _ = jax.jit(functools.partial(model.apply, head_mask=mask))(variables, images)
  ref = jax.jit(functools.partial(ref_forward, head_mask=mask))(variables['params'], images)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


def test_one_pass_head_grads_match_per_head_loop(tiny):
  model, variables, images, labels = tiny
  target = 'max_logit'
  mask = jnp.array([[1., 1., 0., 1.], [1., 1., 1., 1.]])
  grads, logits, out, state = jax.jit(functools.partial(
      R.div_head_input_grads, model, div_layers=(0, 1), target=target, labels=labels,
      head_mask=mask))(variables, images)
  assert state == {} and set(out) >= {'block0', 'block1'}
  loop = jax.jit(functools.partial(loop_head_grads, target=target, labels=labels,
                                   head_mask=mask), static_argnums=2)
  for layer in (0, 1):
    ref = loop(variables['params'], images, layer)
    assert grads[layer].shape == (3, 4, 7, 16)
    np.testing.assert_allclose(grads[layer], ref, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(grads[0][:, 2]).max()) == 0.0  # the masked head has no influence
  assert float(jnp.abs(grads[1][:, 2]).max()) > 0.0


def test_div_loss_and_param_grads_match_loop_reference(tiny):
  model, variables, images, labels = tiny
  lam = 0.3
  reg = R.build([dict(name='div', weight=lam, layers=(-1,), target='label_logit')], model)
  assert reg.div_layers == (1,) and reg.attention_layers == (1,)

  def fast(params):
    logits, _, total, terms, _ = reg({'params': params}, images, labels=labels)
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])
    return ce + total, terms['div']

  def slow(params):
    logits = ref_forward(params, images)
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])
    l_ig = loop_div_loss(loop_head_grads(params, images, 1, target='label_logit',
                                         labels=labels))
    return ce + lam * l_ig, l_ig

  (v_fast, t_fast), g_fast = jax.jit(jax.value_and_grad(fast, has_aux=True))(
      variables['params'])
  (v_slow, t_slow), g_slow = jax.jit(jax.value_and_grad(slow, has_aux=True))(
      variables['params'])
  assert float(t_fast) > 1e-5  # the term is not trivially zero
  np.testing.assert_allclose(t_fast, t_slow, rtol=1e-4)
  np.testing.assert_allclose(v_fast, v_slow, rtol=1e-4)
  flat_fast = jax.tree_util.tree_leaves_with_path(g_fast)
  flat_slow = dict(jax.tree_util.tree_leaves_with_path(g_slow))
  for path, leaf in flat_fast:
    np.testing.assert_allclose(leaf, flat_slow[path], rtol=2e-3, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  # The second-order part is not negligible: DIV moves the gradient away from ERM's.
  g_ce = jax.jit(jax.grad(lambda p: -jnp.mean(jax.nn.log_softmax(ref_forward(p, images))[
      jnp.arange(3), labels])))(variables['params'])
  diff = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), g_fast, g_ce)
  assert max(jax.tree.leaves(diff)) > 1e-4


# --------------------------------------------------------------------------------------
# Spatial distance penalty.
# --------------------------------------------------------------------------------------


def np_penalty(gh, gw, kind, alpha=4.0, beta=0.5, gamma=0.1):
  pos = [(r, c) for r in range(gh) for c in range(gw)]
  n = len(pos)
  d = np.zeros((n, n))
  for i, j in itertools.product(range(n), range(n)):
    d[i, j] = abs(pos[i][0] - pos[j][0]) + abs(pos[i][1] - pos[j][1])
  out = np.zeros((n, n))
  for i, j in itertools.product(range(n), range(n)):
    m = max(d[i])
    if kind == 'normalized':
      out[i, j] = d[i, j] / d.max()
    elif kind == 'smooth_sign':
      a = d[i, j] - m / alpha
      out[i, j] = a / math.sqrt(a * a + beta)
    else:
      out[i, j] = (d[i, j] + gamma) / (m + 1)
  return d, out


@pytest.mark.parametrize('kind', R.PENALTY_KINDS)
def test_penalty_matrices_match_numpy(kind):
  d, p = np_penalty(3, 5, kind)
  np.testing.assert_allclose(R.manhattan_distance_matrix(3, 5), d)
  np.testing.assert_allclose(R.distance_penalty_matrix(3, 5, kind), p, rtol=1e-6, atol=1e-7)


def np_map_loss(attn, penalty, prefix, per_head, normalize, bias, log, batch_sum):
  b, h = attn.shape[:2]
  per_image = []
  for i in range(b):
    pen = penalty[i] if penalty.ndim == 3 else penalty
    maps = [attn[i, k, prefix:, prefix:] for k in range(h)]
    if not per_head:
      maps = [sum(maps) / h]
    vals = []
    for a in maps:
      if normalize:
        a = (a - a.min()) / (a.max() - a.min())
      vals.append(sum(a[n, m] * (pen[n, m] + bias)
                      for n in range(a.shape[0]) for m in range(a.shape[1])))
    per_image.append(sum(vals) / len(vals))
  total = sum(per_image) if batch_sum else sum(per_image) / b
  return math.log(max(total, 1.0)) if log else total


def _attn(b, h, t, seed=0):
  logits = np.random.default_rng(seed).normal(size=(b, h, t, t)) * 2
  return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1), np.float64)


@pytest.mark.parametrize('per_head,normalize,log,batch_sum', [
    (False, False, False, False), (True, True, False, False), (False, True, True, True),
    (True, False, True, True)])
def test_distance_loss_matches_numpy(per_head, normalize, log, batch_sum):
  attn = _attn(2, 3, 1 + 2 * 3)  # CLS + a 2x3 grid
  for kind in R.PENALTY_KINDS:
    _, pen = np_penalty(2, 3, kind)
    if log:
      attn = attn * 20  # so that the loss exceeds 1 and the log is active
    expected = np_map_loss(attn, pen, 1, per_head, normalize, 0.0, log, batch_sum)
    got = R.distance_loss(jnp.asarray(attn, jnp.float32), (2, 3), num_prefix_tokens=1,
                          penalty=kind, per_head=per_head, normalize_attention=normalize,
                          log=log, batch_reduction='sum' if batch_sum else 'mean')
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_head_mean_equals_mean_of_heads_without_nonlinear_options():
  attn = jnp.asarray(_attn(2, 4, 6), jnp.float32)
  a = R.distance_loss(attn, (2, 3), penalty='smooth_sign')
  b = R.distance_loss(attn, (2, 3), penalty='smooth_sign', per_head=True)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_distance_loss_prefers_local_attention():
  n = 9
  local = jnp.eye(n)[None, None]
  uniform = jnp.full((1, 1, n, n), 1.0 / n)
  for kind in R.PENALTY_KINDS:
    assert R.distance_loss(local, (3, 3), penalty=kind) < R.distance_loss(
        uniform, (3, 3), penalty=kind)


# --------------------------------------------------------------------------------------
# Patch similarity penalty.
# --------------------------------------------------------------------------------------


def np_gram(images, gh, gw, region=None):
  b, h, w, c = images.shape
  ph, pw = h // gh, w // gw
  rh, rw = (ph, pw) if region is None else region
  out = np.zeros((b, gh * gw, c, c))
  for i in range(b):
    for r in range(gh):
      for s in range(gw):
        top, left = r * ph + (ph - rh) // 2, s * pw + (pw - rw) // 2
        f = np.zeros((c, rh * rw))
        for y in range(rh):
          for x in range(rw):
            yy, xx = top + y, left + x
            if 0 <= yy < h and 0 <= xx < w:
              f[:, y * rw + x] = images[i, yy, xx]
        out[i, r * gw + s] = f @ f.T / (c * rh * rw)
  return out


def np_similarity(gram, metric='mse', p=0.1, eps=1e-6):
  b, n = gram.shape[:2]
  s = np.zeros((b, n, n))
  for i in range(b):
    for u in range(n):
      for v in range(n):
        diff = (gram[i, u] - gram[i, v]).ravel()
        if metric == 'mse':
          s[i, u, v] = np.mean(diff ** 2)
        else:
          s[i, u, v] = np.sum(np.abs(diff + eps) ** p) ** (1 / p)
  return s


@pytest.mark.parametrize('region', [None, (3, 3), (6, 2)])
def test_gram_and_similarity_match_numpy(region):
  images = np.random.default_rng(1).normal(size=(2, 8, 12, 3)).astype(np.float32)
  gram = np_gram(images.astype(np.float64), 2, 3, region)
  np.testing.assert_allclose(R.patch_gram_matrices(jnp.asarray(images), (2, 3), region),
                             gram, rtol=1e-5, atol=1e-6)
  s = np.asarray(R.similarity_matrix(jnp.asarray(images), (2, 3), region_size=region))
  np.testing.assert_allclose(s, np_similarity(gram), rtol=1e-4, atol=1e-6)
  assert np.all(s >= 0) and np.all(s == np.swapaxes(s, 1, 2))
  assert np.all(s[:, np.arange(6), np.arange(6)] == 0)


def test_authors_similarity_variant_matches_numpy():
  images = np.random.default_rng(2).uniform(size=(2, 8, 8, 3)).astype(np.float32)
  gram = np_gram(images.astype(np.float64), 2, 2)
  s = np_similarity(gram, 'minkowski')
  np.testing.assert_allclose(
      R.similarity_matrix(jnp.asarray(images), (2, 2), metric='minkowski'), s, rtol=2e-3)
  s_norm = (s - s.min((1, 2), keepdims=True)) / (s.max((1, 2), keepdims=True)
                                                 - s.min((1, 2), keepdims=True))
  attn = _attn(2, 2, 5) * 30
  expected = np_map_loss(attn, s_norm, 1, False, False, -0.17, True, True)
  got = R.similarity_loss(jnp.asarray(attn, jnp.float32), jnp.asarray(images), (2, 2),
                          num_prefix_tokens=1, metric='minkowski', normalize_similarity=True,
                          bias=-0.17, log=True, batch_reduction='sum')
  np.testing.assert_allclose(got, expected, rtol=2e-3)


def test_similarity_loss_matches_numpy_and_has_no_image_gradient():
  images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 12, 3)), jnp.float32)
  attn = jnp.asarray(_attn(2, 3, 7), jnp.float32)
  s = np_similarity(np_gram(np.asarray(images, np.float64), 2, 3))
  expected = np_map_loss(np.asarray(attn, np.float64), s, 1, False, False, 0.0, False, False)
  got = R.similarity_loss(attn, images, (2, 3), num_prefix_tokens=1)
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  g = jax.grad(lambda x: R.similarity_loss(attn, x, (2, 3), num_prefix_tokens=1))(images)
  assert float(jnp.abs(g).max()) == 0.0


# --------------------------------------------------------------------------------------
# The training wrapper.
# --------------------------------------------------------------------------------------


def test_empty_config_is_plain_forward(tiny):
  model, variables, images, _ = tiny
  reg = R.build([], model)
  (logits, out, total, terms, state), plain = jax.jit(
      lambda v, x: (reg(v, x), model.apply(v, x)[0]))(variables, images)
  np.testing.assert_array_equal(logits, plain)
  assert float(total) == 0.0 and terms == {} and state == {}
  assert reg.attention_layers == () and reg.div_layers == ()
  assert 'attn' not in out['block0']


def test_wrapper_terms_weights_and_names(tiny):
  model, variables, images, labels = tiny
  config = [dict(name='distance', weight=0.5, layers=(0,), penalty='smooth_sign'),
            dict(name='distance', weight=0.25, layers=(-1,), per_head=True),
            dict(name='similarity', weight=2.0, layers=(1,)),
            dict(name='div', weight=3.0, target='label_logit')]
  reg = R.build(config, model)
  assert reg.attention_layers == (0, 1) and reg.div_layers == (1,)
  def both(v, x, y):
    grads = R.div_head_input_grads(model, v, x, div_layers=(1,), target='label_logit',
                                   labels=y)[0]
    return reg(v, x, labels=y), grads

  (logits, out, total, terms, _), grads = jax.jit(both)(variables, images, labels)
  assert [t.name for t in reg.terms_config] == ['distance_l0', 'distance_l1', 'similarity',
                                                'div']
  assert set(terms) == {'distance_l0', 'distance_l1', 'similarity', 'div'}
  np.testing.assert_allclose(
      terms['distance_l0'],
      R.distance_loss(out['block0']['attn'], (2, 3), num_prefix_tokens=1,
                      penalty='smooth_sign'), rtol=1e-6)
  np.testing.assert_allclose(
      terms['similarity'],
      R.similarity_loss(out['block1']['attn'], images, (2, 3), num_prefix_tokens=1),
      rtol=1e-6)
  np.testing.assert_allclose(terms['div'], R.div_loss(grads[1]), rtol=1e-5)
  np.testing.assert_allclose(logits, model.apply(variables, images)[0], rtol=1e-5,
                             atol=1e-6)
  weights = dict(distance_l0=0.5, distance_l1=0.25, similarity=2.0, div=3.0)
  np.testing.assert_allclose(total, sum(w * terms[k] for k, w in weights.items()),
                             rtol=1e-6)


def test_multi_layer_term_is_sum_over_layers(tiny):
  model, variables, images, _ = tiny
  both = R.build([dict(name='div', weight=1.0, layers=(0, 1))], model)
  assert both.attention_layers == (0, 1)
  one = [R.build([dict(name='div', weight=1.0, layers=(l,))], model) for l in (0, 1)]
  total, parts = jax.jit(lambda v, x: (both(v, x)[3]['div'],
                                        [r(v, x)[3]['div'] for r in one]))(variables, images)
  np.testing.assert_allclose(total, parts[0] + parts[1], rtol=1e-5)


def test_mutable_state_is_returned():
  model = TinyViT(use_bn=True, depth=1)
  images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  for config in ([], [dict(name='div', weight=1.0)]):
    reg = R.build(config, model)
    *_, state = jax.jit(functools.partial(reg, train=True, mutable=['batch_stats']))(
        variables, images)
    assert set(state) == {'batch_stats'}
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state['batch_stats'],
                           variables['batch_stats'])
    assert any(jax.tree.leaves(changed))
    assert jax.jit(reg)(variables, images)[-1] == {}


@pytest.mark.parametrize('config,message', [
    ([dict(name='orth', weight=1.0)], "valid names: ['distance', 'div', 'similarity']"),
    ([dict(name='div', weight=1.0, normalise=True)], "unknown option(s) ['normalise']"),
    ([dict(name='div', weight=1.0, target='top')], "valid choices: ['max_logit'"),
    ([dict(name='distance', weight=1.0, layers=(2,))], 'valid: -2..1'),
    ([dict(name='distance', weight=1.0, layers=(-3,))], 'out of range'),
    ([dict(name='distance', weight=1.0)], 'missing layers'),
    ([dict(name='similarity', layers=(0,))], 'missing weight'),
    ([dict(name='distance', weight=1.0, layers=(0,), penalty='gauss')], "'smooth_sign'"),
    ([dict(name='div', weight=1.0, layers=(1, -1))], 'same block twice'),
])
def test_build_rejects_bad_config(tiny, config, message):
  with pytest.raises(ValueError) as err:
    R.build(config, tiny[0])
  assert message in str(err.value)


def test_build_accepts_config_dicts(tiny):
  import ml_collections
  cfg = ml_collections.ConfigDict(
      dict(regularizers=[dict(name='distance', weight=0.1, layers=[-2])]))
  reg = R.build(cfg.regularizers, tiny[0])
  assert reg.attention_layers == (0,) and reg.terms_config[0].name == 'distance'


def test_label_target_needs_labels(tiny):
  model, variables, images, _ = tiny
  reg = R.build([dict(name='div', weight=1.0, target='label_logit')], model)
  with pytest.raises(ValueError, match='needs labels'):  # raised while tracing
    jax.jit(reg)(variables, images)


# --------------------------------------------------------------------------------------
# The registry: a regularizer registered from outside the package.
# --------------------------------------------------------------------------------------


def mean_attention(ctx, *, scale):
  """A toy penalty: `scale` x the mean attention probability of the block."""
  return scale * jnp.mean(ctx.attn)


@pytest.fixture
def toy_registered():
  spec = R.register(R.RegularizerSpec(name='mean_attention', fn=mean_attention,
                                      options=dict(scale=1.0), needs={R.ATTENTION}))
  yield spec
  del R.REGISTRY[spec.name]  # Other tests list the package's own names.


def np_block0_attention(params, images, patch=4, num_heads=4):
  """TinyViT's block-0 attention probabilities `[B, H, T, T]`, in float64 NumPy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(images, np.float64)
  b, hh, ww, c = x.shape
  gh, gw = hh // patch, ww // patch
  x = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
  x = x @ p['embed']['kernel'] + p['embed']['bias']
  x = np.concatenate([np.broadcast_to(p['cls'], (b, 1, x.shape[-1])), x], 1) + p['pos']
  ln = p['block0']['ln1']
  y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  y = y * ln['scale'] + ln['bias']
  q, k = (np.einsum('bnd,dhe->bhne', y, p['block0'][w]) for w in ('wq', 'wk'))
  logits = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_a_regularizer_registered_from_outside(tiny, toy_registered):
  model, variables, images, _ = tiny
  reg = R.build([dict(name='mean_attention', weight=2.0, layers=(0,), scale=3.0),
                 dict(name='distance', weight=0.5, layers=(-1,))], model)
  assert reg.attention_layers == (0, 1) and reg.div_layers == ()
  _, _, total, terms, _ = jax.jit(reg)(variables, images)
  expected = 3.0 * np.mean(np_block0_attention(variables['params'], images))
  np.testing.assert_allclose(terms['mean_attention'], expected, rtol=1e-5)
  np.testing.assert_allclose(total, 2.0 * terms['mean_attention'] + 0.5 * terms['distance'],
                             rtol=1e-6)
  with pytest.raises(errors.UserError, match=r"unknown option\(s\) \['scal'\]"):
    R.build([dict(name='mean_attention', weight=1.0, layers=(0,), scal=3.0)], model)
  with pytest.raises(errors.UserError) as err:
    R.build([dict(name='mean_attn', weight=1.0, layers=(0,))], model)
  assert ("unknown regularizer name 'mean_attn'; valid names: ['distance', 'div', "
          "'mean_attention', 'similarity']") in str(err.value)


def test_config_validation_reads_the_registry(toy_registered):
  import ml_collections
  from vitreg_jax import config_lib
  config = ml_collections.ConfigDict(dict(
      model_name='vit', total_steps=1,
      regularizers=[dict(name='mean_attention', weight=1.0, layers=(0,))]))
  assert config_lib.with_defaults(config).regularizers[0]['name'] == 'mean_attention'
  config.regularizers = [dict(name='mean_attn', weight=1.0, layers=(0,))]
  with pytest.raises(errors.UserError, match=r"'mean_attn'; valid names: .*'mean_attention'"):
    config_lib.with_defaults(config)
  config.regularizers = [dict(name='div', weight=1.0, target='top')]
  with pytest.raises(errors.UserError, match=r"valid choices: \['max_logit'"):
    config_lib.with_defaults(config)


def test_registering_checks_the_spec(toy_registered):
  # The same definition again (a config file executed twice) replaces it quietly.
  again = R.register(R.RegularizerSpec(name='mean_attention', fn=mean_attention,
                                       options=dict(scale=2.0), needs={R.ATTENTION}))
  assert R.get('mean_attention') is again
  with pytest.raises(errors.UserError, match='already registered'):
    R.register(R.RegularizerSpec(name='mean_attention', fn=lambda ctx: ctx.attn.mean()))
  with pytest.raises(errors.UserError, match="unknown regularizer name 'nope'"):
    R.get('nope')
  with pytest.raises(errors.UserError, match="unknown need"):
    R.RegularizerSpec(name='x', fn=mean_attention, needs={'features'})
  with pytest.raises(errors.UserError, match="must have the option 'target'"):
    R.RegularizerSpec(name='x', fn=mean_attention, needs={R.HEAD_INPUT_GRADS})
  with pytest.raises(errors.UserError, match='not one of its choices'):
    R.RegularizerSpec(name='x', fn=mean_attention, options=dict(kind='a'),
                      choices=dict(kind=('b', 'c')))


def test_div_terms_must_share_one_target(tiny):
  with pytest.raises(errors.UserError, match='must share one target'):
    R.build([dict(name='div', weight=1.0, layers=(0,)),
             dict(name='div', weight=1.0, layers=(1,), target='max_prob')], tiny[0])


def test_a_tagged_div_term_keeps_its_spec(tiny):
  reg = R.build([dict(name='div', weight=1.0, tag='diversity')], tiny[0])
  (term,) = reg.terms_config
  assert term.name == 'diversity' and term.spec is R.get('div')
  assert term.spec.refuse_if_negligible and 'normalize=True' in term.spec.negligible_fix


# --------------------------------------------------------------------------------------
# With the library's ViT (vitreg_jax.models).
# --------------------------------------------------------------------------------------


def _vit(dtype='float32'):
  from vitreg_jax import models
  return models.create('vit', num_classes=3, width=16, depth=2, mlp_dim=32, num_heads=4,
                       patch_size=4, head_zeroinit=False, dtype=dtype)


def vit_loop_head_grads(model, variables, images, layer, head_mask):
  """Reference on the real ViT: one jax.grad per head, the perturbation on that head only."""
  shapes = div.perturbation_shapes(model, variables, images, (layer,), {})
  ((path, leaf),) = div.head_input_leaves(shapes)
  grads = []
  for h in range(leaf.shape[1]):
    def p_star(delta):
      full = jnp.zeros(leaf.shape, leaf.dtype).at[:, h].set(delta)
      logits, _ = model.apply({**variables, 'perturbations': {'Transformer': {
          f'encoderblock_{layer}': {'head_inputs': full}}}}, images, div_layers=(layer,),
          head_mask=head_mask)
      return jnp.sum(R.prediction_target(logits))
    grads.append(jax.grad(p_star)(jnp.zeros(leaf.shape[:1] + leaf.shape[2:], leaf.dtype)))
  return jnp.stack(grads, axis=1)


def test_with_library_vit():
  model = _vit()
  images = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  mask = jnp.array([[1., 1., 1., 1.], [1., 0., 1., 1.]])
  reg = R.build([dict(name='distance', weight=0.1, layers=(0,), penalty='offset'),
                 dict(name='div', weight=10.0)], model)
  assert reg.attention_layers == (0, 1) and reg.div_layers == (1,)
  (logits, out, total, terms, _), plain = jax.jit(lambda v, x: (
      reg(v, x, head_mask=mask), model.apply(v, x, head_mask=mask)[0]))(variables, images)
  assert out['block0']['attn'].shape == (2, 4, 7, 7)
  np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      terms['distance'], R.distance_loss(out['block0']['attn'], (2, 3), num_prefix_tokens=1,
                                         penalty='offset'), rtol=1e-6)
  ref = jax.jit(vit_loop_head_grads, static_argnums=(0, 3))(model, variables, images, 1, mask)
  assert float(jnp.abs(ref[:, 1]).max()) == 0.0 and float(jnp.abs(ref).max()) > 0.0
  np.testing.assert_allclose(terms['div'], R.div_loss(ref), rtol=1e-4)
  np.testing.assert_allclose(total, 0.1 * terms['distance'] + 10.0 * terms['div'], rtol=1e-6)


def test_with_library_vit_in_bfloat16():
  """bf16 compute: the term is float32, close to the float32 model's, and its parameter
  gradient (double backprop, cosine option, a masked head) is finite."""
  images = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  f32, bf16 = _vit(), _vit('bfloat16')
  variables = jax.jit(f32.init)(jax.random.key(1), images)
  mask = jnp.array([[1., 1., 1., 1.], [0., 1., 1., 1.]])
  config = [dict(name='div', weight=1.0, normalize=True)]
  reg32, reg16 = R.build(config, f32), R.build(config, bf16)
  value32 = jax.jit(lambda v: reg32(v, images, head_mask=mask)[2])(variables)
  value16, grads = jax.jit(jax.value_and_grad(
      lambda p: reg16({'params': p}, images, head_mask=mask)[2]))(variables['params'])
  assert value16.dtype == jnp.float32 and float(value32) > 1e-3
  np.testing.assert_allclose(value16, value32, rtol=0.1)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_div_is_exactly_zero_at_init_with_a_zero_head_and_not_with_pytorch_init():
  """Why configs/mnist_cifar.py uses PyTorch's head init: with a zero head, p* is the bias
  alone, so the per-head input gradients, DIV and DIV's parameter gradients are all 0."""
  from vitreg_jax import models
  images = np.random.RandomState(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  entry = dict(name='div', weight=1.0, layers=(-1,), normalize=True, reduction='mean')
  for head, expect_zero in (('zeros', True), ('pytorch', False)):
    model = models.create('vit', 2, width=16, depth=2, mlp_dim=16, num_heads=2, head_dim=8,
                          qkv_bias=False, patch_size=4, head_zeroinit=head == 'zeros',
                          head_init='pytorch')
    variables = jax.jit(model.init)(jax.random.key(0), images)
    reg = R.build([entry], model)

    def total(params):
      return reg({'params': params}, images)[2]

    value, grads = jax.jit(jax.value_and_grad(total))(variables['params'])
    grad_norm = math.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
    if expect_zero:
      assert float(value) == 0.0 and grad_norm == 0.0
    else:
      assert float(value) > 0.0 and grad_norm > 0.0
