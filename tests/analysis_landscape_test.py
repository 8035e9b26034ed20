"""Loss landscapes: a grid point equals the directly computed loss of the perturbed parameters
(with the authors' L2 term and with the squared one); directions are normalized as the
authors' code does (the default: PyTorch's dim 0, q/k/v fused) or per filter (Li et al.),
zero on 1-D and excluded parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from vitreg_jax import models
from vitreg_jax.analysis import landscape
from vitreg_jax.analysis import objective

VIT = dict(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=4)
WD = 0.1
_QKV = ("query", "key", "value")


def _vit():
  model = models.create("vit", 3, **VIT)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 8, 3)))
  # A non-zero head (zero-initialized by default) so the loss depends on every parameter.
  variables = {"params": jax.tree.map(lambda p: p + 0.05, variables["params"])}
  return model, variables


def _batch(seed, n=4):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"image": jax.random.normal(k1, (n, 16, 8, 3)),
          "label": jax.random.randint(k2, (n,), 0, 3)}


def _direct(model, params, batch, l2):
  """NLL + the L2 term (`squared`: WD / 2 * sum of squares of the >= 2-D parameters;
  `authors`: WD * the sum of every tensor's norm), accuracy, |theta| and the sum of norms,
  by hand."""
  logits, _ = model.apply({"params": params}, batch["image"])
  z = np.asarray(logits, np.float64)
  logp = z - scipy.special.logsumexp(z, axis=-1, keepdims=True)
  nll = -np.mean(logp[np.arange(len(logp)), np.asarray(batch["label"])])
  leaves = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
  norm_sum = sum(np.sqrt(np.sum(p**2)) for p in leaves)
  penalty = (0.5 * WD * sum(np.sum(p**2) for p in leaves if p.ndim >= 2) if l2 == "squared"
             else WD * norm_sum)
  acc = np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(batch["label"]))
  return nll + penalty, nll, acc, np.sqrt(sum(np.sum(p**2) for p in leaves)), norm_sum


@pytest.mark.parametrize("l2", ["squared", "authors"])
def test_grid_point_equals_loss_of_perturbed_parameters(l2):
  model, variables = _vit()
  d1, d2 = landscape.random_directions(variables["params"], jax.random.PRNGKey(3))
  obj = objective.Objective(model, variables, num_classes=3, weight_decay=WD, l2=l2)
  # Flattened in the objective's order: a wrong order would move the wrong parameters.
  evaluate = landscape.make_evaluator(obj, obj.theta, landscape.flat_directions(obj, [d1, d2]))
  coords = np.array([[0.0, 0.0], [0.3, -0.7], [-1.0, 0.5]], np.float32)
  batches = [_batch(1), _batch(2)]
  # 3 points in chunks of 2: the padded last chunk is evaluated by the same compiled function.
  got = landscape.evaluate_points(evaluate, coords, batches, points_per_call=2)
  for i, (a, b) in enumerate(coords):
    params = jax.tree.map(lambda p, u, v: p + a * u + b * v, variables["params"], d1, d2)
    want = np.mean([_direct(model, params, batch, l2) for batch in batches], axis=0)
    np.testing.assert_allclose(got["loss"][i], want[0], rtol=1e-5)
    np.testing.assert_allclose(got["ce"][i], want[1], rtol=1e-4)
    np.testing.assert_allclose(got["accuracy"][i], want[2])
    np.testing.assert_allclose(got["l2_norm"][i], want[3], rtol=1e-5)
    np.testing.assert_allclose(got["norm_sum"][i], want[4], rtol=1e-5)
  assert got["loss"][1] != got["loss"][0]  # the directions do move the loss


def _filter_norms(x, axes):
  return np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=axes))


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_directions_are_filter_normalized(name):
  kw = VIT if name == "vit" else dict(depth=18, width=2)
  model = models.create(name, 3, **kw)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 8, 3)))["params"]
  params = jax.tree.map(lambda p: p + 0.05, params)
  d, = landscape.random_directions(params, jax.random.PRNGKey(1), 1, normalization="filter")
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_d = dict(jax.tree_util.tree_flatten_with_path(d)[0])
  checked = set()
  for path, w in flat_p.items():
    names = [str(k.key) for k in path]
    v = np.asarray(flat_d[path])
    if w.ndim < 2 or names[-1] == "bias" or names[-1] == "pos_embedding":
      assert not v.any(), names  # 1-D params, biases (q/k/v's are 2-D) and pos. embeddings
      continue
    # One filter per output unit: q/k/v kernels [width, heads, head_dim] -> per (head, dim).
    out = 2 if names[-2:-1] in (["query"], ["key"], ["value"]) else 1
    axes = tuple(range(w.ndim - out))
    np.testing.assert_allclose(_filter_norms(v, axes), _filter_norms(w, axes), rtol=1e-5)
    checked.add(names[-2] if names[-1] == "kernel" else names[-1])
  want = {"query", "out", "Dense_0", "embedding", "head", "cls"} if name == "vit" else {
      "Conv_0", "stem_conv", "shortcut", "head"}
  assert want <= checked, checked


def test_exclude_and_authors_normalization():
  _, variables = _vit()
  params = variables["params"]
  d, = landscape.random_directions(params, jax.random.PRNGKey(1), 1, exclude=("head", "query"),
                                   normalization="authors")
  assert not np.asarray(d["head"]["kernel"]).any()
  attn = d["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert not np.asarray(attn["query"]["kernel"]).any() and np.asarray(attn["key"]["kernel"]).any()
  # The authors' variant: norms over a kernel's output axes (PyTorch dim 0), one per input.
  w = params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  v = d["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  np.testing.assert_allclose(_filter_norms(v, (1,)), _filter_norms(w, (1,)), rtol=1e-5)
  assert landscape.excluded_names(params, ("head",)) == ["head/kernel"]
  with pytest.raises(ValueError, match="normalization must be one of"):
    landscape.random_directions(params, jax.random.PRNGKey(1), normalization="layer")


def test_coordinates_layout():
  parts = landscape.coordinates(3, 5, 2.0)
  np.testing.assert_allclose(parts["grid"][:3], [[-2, -2], [0, -2], [2, -2]])  # row = y
  np.testing.assert_allclose(parts["line"][:, 0], [-2, -1, 0, 1, 2])
  assert not parts["line"][:, 1].any() and not parts["center"].any()


def test_authors_normalization_is_their_dim0_with_qkv_fused_and_the_default():
  _, variables = _vit()
  params = variables["params"]
  d, = landscape.random_directions(params, jax.random.PRNGKey(1), 1, exclude=())
  authors, = landscape.random_directions(params, jax.random.PRNGKey(1), 1, exclude=(),
                                         normalization="authors")
  jax.tree.map(np.testing.assert_array_equal, d, authors)  # the default is the authors'
  attn_w = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  attn_d = d["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  # Their timm ViT's fused qkv weight [3 width, width]: one norm per input feature over the
  # q, k and v outputs together (ours: three kernels [width, heads, head_dim]).
  fused = lambda a: np.sqrt(sum(_filter_norms(a[k]["kernel"], (1, 2)) ** 2 for k in _QKV))
  np.testing.assert_allclose(fused(attn_d), fused(attn_w), rtol=1e-5)
  q_d, q_w = (_filter_norms(a["query"]["kernel"], (1, 2)) for a in (attn_d, attn_w))
  assert not np.allclose(q_d, q_w, rtol=1e-2)  # not normalized kernel by kernel
  # The attention output kernel [heads, head_dim, width]: over its output axis (dim 0 of
  # PyTorch's [width, width]); the class token [1, 1, width]: over its axis 0, like theirs.
  np.testing.assert_allclose(_filter_norms(attn_d["out"]["kernel"], (2,)),
                             _filter_norms(attn_w["out"]["kernel"], (2,)), rtol=1e-5)
  np.testing.assert_allclose(np.abs(d["cls"]), np.abs(params["cls"]), rtol=1e-4)
