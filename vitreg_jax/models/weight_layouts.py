"""Translation of public ViT weight layouts (big_vision, timm) into `models.vit.ViT`'s names.

`ViT` uses the names of the AugReg `.npz` releases (`Transformer/posembed_input/pos_embedding`
over CLS + patches, `Transformer/encoderblock_{i}/...`). Two other layouts are common:

**big_vision, current** (google-research/big_vision `big_vision/models/vit.py`, the `_Model`
module and its `fix_old_checkpoints`): the learned position embedding is a top-level
`pos_embedding [1, gh * gw, D]` over the patches only, added *before* the CLS token (`cls`,
`pool_type='tok'`) is prepended, so the CLS token has no position embedding. A checkpoint of the
older big_vision code (`Transformer/pos_embedding`) may instead hold `1 + gh * gw` rows, the
first for CLS. Models trained with `scan=True` stack all blocks in one
`Transformer/encoderblock/...` with a leading depth axis; `pool_type='map'` adds `MAPHead_0`
(see `map_head.py`). Translation: the embedding moves to `Transformer/posembed_input/` with a
zero row in front when the model has a CLS token and the checkpoint has no row for it
(`cls + 0 + ...` is exactly the big_vision forward); stacked blocks are split. Everything else
already has `ViT`'s names.

**timm** (`timm.models.vision_transformer.VisionTransformer.state_dict()`, PyTorch
conventions): `patch_embed.proj.weight [D, C, p, p]` (a conv on NCHW images), `cls_token`,
`pos_embed` (with a CLS row, or patches only when `no_embed_class=True`), per block `norm1`,
`attn.qkv` (fused: rows are `[q; k; v]`, each `(head, head_dim)`-major), `attn.proj`, `norm2`,
`mlp.fc1`, `mlp.fc2`; `norm`, `head`. Linear weights are `[out, in]` (transposed here), a
LayerNorm's `weight` is flax's `scale`. timm's GELU is the exact erf form: build the model with
`gelu_approximate=False` to reproduce timm's logits. Layer scale, register tokens, `fc_norm`
(average pooling followed by a norm), `norm_pre`, q/k norms and timm's attention-pool head have
no `ViT` equivalent and are refused with an error naming the keys.

**diverse_vit** (the head-diversity authors' ViT, ArmandNM/diverse-vit
`diverse_vit/models/vision_transformer.py`, `DiverseViT`, adapted from lucidrains' vit-pytorch;
their checkpoints are `torch.save(model.state_dict())` of the `Recorder` wrapping it, so every
key starts with `vit.`, `diverse_vit/logging.py`, `log_state_dict`): `to_patch_embedding.1`
is a Linear over each patch flattened as `(p1 p2 c)` (reshaped here to the patch conv's
`[p, p, C, D]`), `pos_embedding [1, 1 + N, D]` (CLS row first), `cls_token`; per layer i
`transformer.layers.{i}.0` = `PreNorm(Attention)` (`norm`, bias-free `fn.to_qkv` whose rows
are `[q; k; v]`, each `(head, dim_head)`-major, `fn.proj.0`; no `proj` when one head of the
model width, an identity here), `transformer.layers.{i}.1` = `PreNorm(FeedForward)` (`norm`,
`fn.net.0`, `fn.net.3`); `mlp_head.0` (LayerNorm, our `encoder_norm`) and `mlp_head.1` (the
head). Their LayerNorm eps (1e-5), exact GELU and the missing residual around the last
attention are model fields (`configs/mnist_cifar.py`, `AUTHORS_MODEL`), not in the file.
Detected from the `transformer.layers.` keys; `num_heads` comes from the model, as for timm.

    python -m vitreg_jax.models.weight_layouts FILE.npz|FILE.safetensors
prints the detected layout and the `ViT` geometry the file implies.
"""

import math
import re
import sys
from typing import Dict, Optional, Sequence

from etils import epath
import numpy as np

from vitreg_jax import errors

LAYOUTS = ('augreg', 'big_vision', 'timm', 'diverse_vit')
POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
_BV_POSEMB_KEYS = ('pos_embedding', 'Transformer/pos_embedding')
_SCAN_PREFIX = 'Transformer/encoderblock/'
# Prefixes some releases put in front of the parameter paths (optimizer state, train state).
_STRIP_PREFIXES = ('params/', 'opt/target/')
# timm keys without a ViT equivalent, with the timm option that produced them.
_TIMM_UNSUPPORTED = (
    (r'(^|\.)ls[12]\.gamma$', 'layer scale (init_values)'),
    (r'^reg_token$', 'register tokens (reg_tokens)'),
    (r'^fc_norm\.', "a norm after average pooling (global_pool='avg' / fc_norm=True)"),
    (r'^norm_pre\.', 'a norm before the blocks (pre_norm=True)'),
    (r'\.(q_norm|k_norm)\.', 'q/k normalization (qk_norm=True)'),
    (r'^attn_pool\.', "timm's attention-pool head (global_pool='map')"),
    (r'^patch_embed\.norm\.', 'a norm after the patch embedding'),
)


def read(path) -> Dict[str, np.ndarray]:
  """Reads `.npz` or `.safetensors` into {key: float32 array} (strips 'params/', 'opt/target/').

  `path` may be any `etils.epath` path (`gs://...`).
  """
  path = epath.Path(path)
  if path.name.endswith('.safetensors'):
    try:
      from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'Reading {path} needs the `safetensors` package: pip install '
                        'safetensors (or save the state_dict as .npz).') from e
    flat = load(path.read_bytes())
  elif path.name.endswith('.npz'):
    with path.open('rb') as f, np.load(f, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k]) for k in data.files}
  else:
    raise errors.UserError(f'Unknown weight file type {path!r}: expected .npz or .safetensors.')
  out = {}
  for key, value in flat.items():
    for prefix in _STRIP_PREFIXES:
      key = key.removeprefix(prefix)
    out[key] = value.astype(np.float32) if value.dtype.kind == 'f' else value
  return out


def detect(flat: Dict[str, np.ndarray]) -> str:
  """Names the layout of a flat checkpoint: 'timm', 'big_vision', 'diverse_vit' or 'augreg'."""
  if any(k.removeprefix('vit.').startswith('transformer.layers.') for k in flat):
    return 'diverse_vit'
  if any(k.startswith(('blocks.', 'patch_embed.')) for k in flat):
    return 'timm'
  if (any(k in flat for k in _BV_POSEMB_KEYS) or 'probe' in flat
      or any(k.startswith((_SCAN_PREFIX, 'MAPHead_0/')) for k in flat)):
    return 'big_vision'
  return 'augreg'


def _with_cls_row(posemb: np.ndarray, has_cls: bool, grid_hw: Optional[Sequence[int]],
                  hint_hw: Optional[Sequence[int]] = None):
  """Prepends a zero CLS row when the checkpoint has CLS and the embedding covers patches only.

  `grid_hw` is the checkpoint's patch grid when known; otherwise the grid `hint_hw` of the
  model being loaded decides when the length is its size (patches only) or one more (a CLS
  row); failing both, a square length means patches only.
  """
  n = posemb.shape[1]
  if grid_hw is not None:
    patches_only = n == grid_hw[0] * grid_hw[1]
  elif hint_hw is not None and n in (hint_hw[0] * hint_hw[1], hint_hw[0] * hint_hw[1] + 1):
    # The model's own grid decides first: 1 + 8 tokens of a 4 x 2 grid are a square too.
    patches_only = n == hint_hw[0] * hint_hw[1]
  else:
    patches_only = math.isqrt(n) ** 2 == n
  if has_cls and patches_only:
    return np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  return posemb


def from_big_vision(flat: Dict[str, np.ndarray], *, grid_hw: Optional[Sequence[int]] = None,
                    hint_hw: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """big_vision (current or older) / AugReg layout -> `ViT` names (AugReg input is unchanged).

  Args:
    flat: {'/'-joined key: array}, 'params/' prefixes already stripped.
    grid_hw: the checkpoint's patch grid; needed only when it is not square.
    hint_hw: the patch grid of the model being loaded (a non-square checkpoint of that grid
      needs no `grid_hw`).
  """
  out = dict(flat)
  if 'probe' in out:  # MAP heads of early big_vision code were inlined at the top level.
    for name in [k for k in out if k == 'probe' or k.split('/')[0] in (
        'MultiHeadDotProductAttention_0', 'MlpBlock_0', 'LayerNorm_0')]:
      out['MAPHead_0/' + name] = out.pop(name)
  scanned = [k for k in out if k.startswith(_SCAN_PREFIX)]
  for key in scanned:  # scan=True: one stacked block, leading axis = depth.
    stacked = out.pop(key)
    for i, value in enumerate(stacked):
      out[f'Transformer/encoderblock_{i}/{key[len(_SCAN_PREFIX):]}'] = value
  for key in _BV_POSEMB_KEYS:
    if key in out:
      if POSEMB_KEY in out:
        raise errors.UserError(f'Checkpoint has two position embeddings: {key} and {POSEMB_KEY}.')
      out[POSEMB_KEY] = _with_cls_row(out.pop(key), 'cls' in out, grid_hw, hint_hw)
  return out


def _linear(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(w.T)


def _timm_block(get, i: int, num_heads: int) -> Dict[str, np.ndarray]:
  """One timm block `blocks.{i}.*` -> `Transformer/encoderblock_{i}/*`."""
  src, dst = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
  attn = dst + 'MultiHeadDotProductAttention_0/'
  qkv = get(src + 'attn.qkv.weight')  # [3D, D]: rows (q|k|v, head, head_dim)
  d = qkv.shape[1]
  if qkv.shape[0] != 3 * d or d % num_heads:
    raise errors.UserError(f'{src}attn.qkv.weight has shape {qkv.shape}: expected [3 * {d}, {d}] '
                           f'with {d} divisible by num_heads={num_heads}.')
  dh = d // num_heads
  qkv_bias = get(src + 'attn.qkv.bias', np.zeros(3 * d, np.float32))  # qkv_bias=False: zero
  out = {}
  for j, name in enumerate(('query', 'key', 'value')):
    out[attn + name + '/kernel'] = _linear(qkv[j * d:(j + 1) * d]).reshape(d, num_heads, dh)
    out[attn + name + '/bias'] = qkv_bias[j * d:(j + 1) * d].reshape(num_heads, dh)
  # proj's input is the concatenation of the heads, (head, head_dim)-major.
  out[attn + 'out/kernel'] = _linear(get(src + 'attn.proj.weight')).reshape(num_heads, dh, d)
  out[attn + 'out/bias'] = get(src + 'attn.proj.bias')
  for torch_name, flax_name in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_1')):
    out[dst + flax_name + '/scale'] = get(src + torch_name + '.weight')
    out[dst + flax_name + '/bias'] = get(src + torch_name + '.bias')
  for torch_name, flax_name in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
    out[dst + 'MlpBlock_0/' + flax_name + '/kernel'] = _linear(
        get(src + f'mlp.{torch_name}.weight'))
    out[dst + 'MlpBlock_0/' + flax_name + '/bias'] = get(src + f'mlp.{torch_name}.bias')
  return out


def from_timm(state: Dict[str, np.ndarray], *, num_heads: int,
              grid_hw: Optional[Sequence[int]] = None,
              hint_hw: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
  """A timm `VisionTransformer.state_dict()` -> `ViT` names and flax shapes.

  Args:
    state: {timm key: array} (`.safetensors` / `.npz` of the state_dict).
    num_heads: the model's number of heads (a timm state_dict does not record it).
    grid_hw / hint_hw: as in `from_big_vision`.
  Raises:
    ValueError naming keys that `ViT` cannot represent (and the timm option behind them), or
    keys this translation does not know.
  """
  bad = sorted(f'{k} ({why})' for k in state for pattern, why in _TIMM_UNSUPPORTED
               if re.search(pattern, k))
  if bad:
    raise errors.UserError(
        'This timm model uses features vitreg_jax ViT does not have: '
        + ', '.join(bad[:8]) + (' ...' if len(bad) > 8 else '')
        + '. Supported: timm ViTs with class-token or no pooling token, no layer '
        'scale, no register tokens, no fc_norm.')
  used = set()

  def get(key, default=None):
    if key not in state:
      if default is not None:
        return default
      raise errors.UserError(f'timm state_dict lacks {key!r}; is it a timm VisionTransformer?')
    used.add(key)
    return np.asarray(state[key], np.float32)

  out = {'embedding/kernel': np.ascontiguousarray(
      get('patch_embed.proj.weight').transpose(2, 3, 1, 0)),  # [D, C, p, p] -> [p, p, C, D]
         'embedding/bias': get('patch_embed.proj.bias')}
  has_cls = 'cls_token' in state
  if has_cls:
    out['cls'] = get('cls_token')
  if 'pos_embed' in state:
    out[POSEMB_KEY] = _with_cls_row(get('pos_embed'), has_cls, grid_hw, hint_hw)
  depth = 1 + max((int(m.group(1)) for k in state
                   if (m := re.match(r'blocks\.(\d+)\.', k))), default=-1)
  for i in range(depth):
    out.update(_timm_block(get, i, num_heads))
  if 'norm.weight' in state:
    out['Transformer/encoder_norm/scale'] = get('norm.weight')
    out['Transformer/encoder_norm/bias'] = get('norm.bias')
  if 'head.weight' in state:
    out['head/kernel'] = _linear(get('head.weight'))
    out['head/bias'] = get('head.bias')
  unknown = sorted(set(state) - used)
  if unknown:
    raise errors.UserError(f'timm state_dict keys with no ViT equivalent: {unknown[:10]}.')
  return out


def _diverse_layer(get, state, i: int, num_heads: int, width: int) -> Dict[str, np.ndarray]:
  """One authors' layer `transformer.layers.{i}.*` -> `Transformer/encoderblock_{i}/*`."""
  src, dst = f'transformer.layers.{i}.', f'Transformer/encoderblock_{i}/'
  attn = dst + 'MultiHeadDotProductAttention_0/'
  qkv = get(src + '0.fn.to_qkv.weight')  # [3 * H * Dh, D], rows (q|k|v, head, dim_head)
  inner = qkv.shape[0] // 3
  if qkv.shape[0] % 3 or inner % num_heads:
    raise errors.UserError(f'{src}0.fn.to_qkv.weight has shape {qkv.shape}: expected '
                           f'[3 * heads * dim_head, {width}] with num_heads={num_heads}.')
  dh = inner // num_heads
  out = {}
  for j, name in enumerate(('query', 'key', 'value')):
    out[attn + name + '/kernel'] = _linear(qkv[j * inner:(j + 1) * inner]).reshape(
        width, num_heads, dh)
  if src + '0.fn.proj.0.weight' in state:
    out[attn + 'out/kernel'] = _linear(get(src + '0.fn.proj.0.weight')).reshape(
        num_heads, dh, width)
    out[attn + 'out/bias'] = get(src + '0.fn.proj.0.bias')
  else:  # `project_out` is False (one head of the model width): the heads' output as is.
    out[attn + 'out/kernel'] = np.eye(width, dtype=np.float32).reshape(1, width, width)
    out[attn + 'out/bias'] = np.zeros(width, np.float32)
  for j, flax_name in ((0, 'LayerNorm_0'), (1, 'LayerNorm_1')):
    out[dst + flax_name + '/scale'] = get(f'{src}{j}.norm.weight')
    out[dst + flax_name + '/bias'] = get(f'{src}{j}.norm.bias')
  for torch_index, flax_name in ((0, 'Dense_0'), (3, 'Dense_1')):
    out[dst + 'MlpBlock_0/' + flax_name + '/kernel'] = _linear(
        get(f'{src}1.fn.net.{torch_index}.weight'))
    out[dst + 'MlpBlock_0/' + flax_name + '/bias'] = get(f'{src}1.fn.net.{torch_index}.bias')
  return out


def from_diverse_vit(state: Dict[str, np.ndarray], *, num_heads: int) -> Dict[str, np.ndarray]:
  """The head-diversity authors' `DiverseViT` state_dict (module docstring) -> `ViT` names.

  Args:
    state: {key: array}, with or without the `Recorder`'s `vit.` prefix.
    num_heads: the model's heads (the file does not record them; 4 in the authors' config).
  Raises:
    errors.UserError naming keys this translation does not know, or a missing one.
  """
  state = {k.removeprefix('vit.'): v for k, v in state.items()}
  used = set()

  def get(key):
    if key not in state:
      raise errors.UserError(f'diverse-vit state_dict lacks {key!r}; is it a DiverseViT '
                             '(ArmandNM/diverse-vit) checkpoint?')
    used.add(key)
    return np.asarray(state[key], np.float32)

  patch = get('to_patch_embedding.1.weight')  # [D, p * p * C], inputs ordered (p1 p2 c)
  width, channels = patch.shape[0], 3
  p = math.isqrt(patch.shape[1] // channels)
  if p * p * channels != patch.shape[1]:
    raise errors.UserError(f'to_patch_embedding.1.weight {patch.shape}: not a square patch of '
                           f'{channels} channels.')
  out = {'embedding/kernel': _linear(patch).reshape(p, p, channels, width),
         'embedding/bias': get('to_patch_embedding.1.bias'),
         'cls': get('cls_token'), POSEMB_KEY: get('pos_embedding'),
         'Transformer/encoder_norm/scale': get('mlp_head.0.weight'),
         'Transformer/encoder_norm/bias': get('mlp_head.0.bias'),
         'head/kernel': _linear(get('mlp_head.1.weight')), 'head/bias': get('mlp_head.1.bias')}
  depth = 1 + max((int(m.group(1)) for k in state
                   if (m := re.match(r'transformer\.layers\.(\d+)\.', k))), default=-1)
  for i in range(depth):
    out.update(_diverse_layer(get, state, i, num_heads, width))
  unknown = sorted(set(state) - used)
  if unknown:
    raise errors.UserError(f'diverse-vit state_dict keys with no ViT equivalent: {unknown[:10]}.')
  return out


def describe(flat: Dict[str, np.ndarray]) -> dict:
  """The `ViT` geometry a checkpoint implies (after translation to `ViT` names)."""
  kernel = flat['embedding/kernel']
  depth = sum(1 for k in flat if re.fullmatch(r'Transformer/encoderblock_\d+/LayerNorm_0/scale', k))
  info = dict(width=int(kernel.shape[-1]), depth=depth, patch_size=int(kernel.shape[0]),
              classifier='map' if 'MAPHead_0/probe' in flat else
              'token' if 'cls' in flat else 'gap (or big_vision pool_type "0"/"none")',
              posemb='learn' if POSEMB_KEY in flat else 'sincos2d (no learned embedding)')
  mlp = flat.get('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel')
  query = flat.get('Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel')
  if mlp is not None:
    info['mlp_dim'] = int(mlp.shape[1])
  if query is not None and query.ndim == 3:
    info['num_heads'] = int(query.shape[1])
  if 'pre_logits/kernel' in flat:
    info['representation_size'] = int(flat['pre_logits/kernel'].shape[1])
  if 'head/kernel' in flat:
    info['num_classes'] = int(flat['head/kernel'].shape[1])
  return info


def main(argv):
  if len(argv) != 2:
    raise SystemExit('usage: python -m vitreg_jax.models.weight_layouts FILE.npz|.safetensors')
  flat = read(argv[1])
  layout = detect(flat)
  # num_heads is not stored in a timm file: translate with 1 head just to read the geometry.
  converted = (from_timm(flat, num_heads=1) if layout == 'timm'
               else from_diverse_vit(flat, num_heads=1) if layout == 'diverse_vit'
               else from_big_vision(flat))
  info = describe(converted)
  for key in ('pos_embed', POSEMB_KEY, *_BV_POSEMB_KEYS):  # The pretraining resolution.
    if key in flat:
      info['posemb_tokens_in_file'] = int(flat[key].shape[1])
  if layout in ('timm', 'diverse_vit'):
    info['num_heads'] = f'not stored in {layout} files: set it from the model that wrote it'
    info['gelu_approximate'] = False
  print(dict(layout=layout, **info))


if __name__ == '__main__':
  main(sys.argv)
