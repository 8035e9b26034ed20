"""`layer_norm_eps` reaches every LayerNorm of the ViT / ARViT encoder (and the MAP head): each
LayerNorm call, intercepted, equals a hand-written LayerNorm with that epsilon; and the
configs that build the head-diversity authors' PyTorch model use PyTorch's 1e-5."""

import flax.linen as nn
import numpy as np
import pytest

from vitreg_jax import models

import testutil  # pylint: disable=g-bad-import-order

TINY_VIT = dict(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=8, head_zeroinit=False)
TINY_ARVIT = dict(width=16, depth=2, num_heads=2, patch_size=8, head_zeroinit=False)


def _np_layer_norm(x, scale, bias, eps):
  x = np.asarray(x, np.float64)
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _layer_norm_calls(model, variables, x):
  """(path, input, output, params) of every LayerNorm call while applying `model`."""
  calls = []

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.LayerNorm) and context.method_name == '__call__':
      calls.append(('/'.join(context.module.path), np.asarray(args[0]), np.asarray(y),
                    context.module.variables['params']))
    return y

  with nn.intercept_methods(record):
    model.apply(variables, x)
  return calls


@pytest.mark.parametrize('name,kw,eps,count', [
    ('vit', dict(TINY_VIT), 1e-6, 5),                       # default, flax's
    ('vit', dict(TINY_VIT, layer_norm_eps=0.5), 0.5, 5),    # 2 per block + encoder_norm
    ('vit', dict(TINY_VIT, classifier='map', layer_norm_eps=0.5), 0.5, 6),  # + MAP head's
    ('arvit', dict(TINY_ARVIT, layer_norm_eps=0.5), 0.5, 4),                # no final norm
    ('arvit', dict(TINY_ARVIT, variant='code', width=16, num_heads=2), 1e-5, 5),  # post-norm
    ('arvit', dict(TINY_ARVIT, variant='code', width=16, num_heads=2, layer_norm_eps=0.5),
     0.5, 5),
])
def test_every_layer_norm_uses_the_field(name, kw, eps, count):
  model = models.create(name, 3, **kw)
  x = np.random.RandomState(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  # eps 0.5 is of the order of the inputs' variances: using it or not shows.
  calls = _layer_norm_calls(model, testutil.np_init(model, x, 1), x)
  assert len(calls) == count, [c[0] for c in calls]
  for path, inputs, outputs, params in calls:
    want = _np_layer_norm(inputs, params['scale'], params['bias'], eps)
    np.testing.assert_allclose(outputs, want, rtol=2e-4, atol=2e-5, err_msg=path)
    if eps == 0.5:  # and not flax's default: the field, not the default, was used
      other = _np_layer_norm(inputs, params['scale'], params['bias'], 1e-6)
      assert not np.allclose(outputs, other, rtol=1e-3, atol=1e-3), path


def test_eps_changes_the_logits_and_is_checked():
  x = np.random.RandomState(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  default = models.create('vit', 3, **TINY_VIT)
  variables = testutil.np_init(default, x, 1)
  torch_eps = models.create('vit', 3, **TINY_VIT, layer_norm_eps=1e-5)
  a, b = default.apply(variables, x)[0], torch_eps.apply(variables, x)[0]
  assert not np.array_equal(a, b)
  np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # small, as eps << variances
  with pytest.raises(ValueError, match='layer_norm_eps must be > 0'):
    models.create('vit', 3, **TINY_VIT, layer_norm_eps=0.0)


@pytest.mark.parametrize('arg', ['reg=erm', 'reg=div', 'reg=div,data=dominoes', 'runlocal'])
def test_the_authors_mnist_cifar_model_uses_pytorch_eps(arg):
  """configs/mnist_cifar.py builds ArmandNM/diverse-vit's ViT: `nn.LayerNorm(dim)`, eps 1e-5."""
  config = testutil.get_config('mnist_cifar', arg)
  assert config.model.layer_norm_eps == 1e-5
  assert _model(config).layer_norm_eps == 1e-5


def test_other_vits_keep_flax_eps():
  """AugReg / big_vision and timm ViTs were trained with 1e-6 (Waterbirds fine-tunes them)."""
  for name, arg in [('waterbirds', 'reg=div'), ('quickstart', None),
                    ('how_vits_work', 'model=vit')]:
    assert _model(testutil.get_config(name, arg)).layer_norm_eps == 1e-6, name


def _model(config):
  """The model a config builds (the module only: its fields are what these tests read)."""
  return models.create(config.model_name, testutil.num_classes(config), **config.model.to_dict())
