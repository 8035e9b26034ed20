"""The training wrapper: `build(config.regularizers, model)` -> one call giving the logits
and every configured penalty (docs/design.md, Regularizers).

Training usage::

    reg = regularizers.build(config.regularizers, model)
    logits, out, reg_total, terms, new_state = reg(variables, images, labels=labels,
                                                   train=True, rngs={'dropout': key})
    loss = cross_entropy(logits, labels) + reg_total
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax import models
from vitreg_jax.checks import check_choice
from vitreg_jax.checks import resolve_layers
from vitreg_jax.regularizers.attention_maps import (BATCH_REDUCTIONS, PENALTY_KINDS,
                                                    SIMILARITY_METRICS, distance_loss,
                                                    similarity_loss)
from vitreg_jax.regularizers.div import (DIV_REDUCTIONS, DIV_TARGETS, div_head_input_grads,
                                         div_loss, strip_perturbations)

@dataclasses.dataclass(frozen=True)
class _Spec:
  kind: str                      # 'div' or 'attention'
  options: Mapping[str, Any]     # valid options and their defaults
  default_layers: Optional[tuple[int, ...]]  # None: `layers` is required


_MAP_OPTIONS = dict(per_head=False, normalize_attention=False, bias=0.0, log=False,
                    batch_reduction='mean')

REGULARIZERS: dict[str, _Spec] = {
    'div': _Spec('div', dict(target='max_logit', normalize=False, reduction='sum'), (-1,)),
    'distance': _Spec('attention', dict(penalty='normalized', alpha=4.0, beta=0.5,
                                        gamma=0.1, **_MAP_OPTIONS), None),
    'similarity': _Spec('attention', dict(region_size=None, metric='mse', p=0.1, eps=1e-6,
                                          normalize_similarity=False, **_MAP_OPTIONS),
                        None),
}
_CHOICES = dict(target=DIV_TARGETS, reduction=DIV_REDUCTIONS, penalty=PENALTY_KINDS,
                metric=SIMILARITY_METRICS, batch_reduction=BATCH_REDUCTIONS)
_ENTRY_KEYS = ('name', 'weight', 'layers', 'tag')


@dataclasses.dataclass(frozen=True)
class _Term:
  name: str        # unique key in `terms`
  regularizer: str
  weight: float
  layers: tuple[int, ...]
  options: Mapping[str, Any]


def _resolve_layers(layers, depth: int, where: str) -> tuple[int, ...]:
  """`checks.resolve_layers`, plus what a term needs: at least one block, none twice."""
  if isinstance(layers, str):  # A config's layers are ints, never the command line's text.
    raise errors.UserError(f'{where}: layers {layers!r} is not a tuple of ints.')
  resolved = resolve_layers(layers, depth, where)
  if not resolved:
    raise errors.UserError(f'{where}: layers is empty; give at least one block index.')
  if len(set(resolved)) != len(resolved):
    raise errors.UserError(f'{where}: layers {tuple(layers)} name the same block twice.')
  return resolved


def _parse_entry(index: int, entry: Mapping[str, Any], depth: int) -> _Term:
  entry = dict(entry)
  name = entry.get('name')
  if name not in REGULARIZERS:
    raise errors.UserError(f'regularizers[{index}]: unknown regularizer name {name!r}; valid '
                     f'names: {sorted(REGULARIZERS)}.')
  spec = REGULARIZERS[name]
  where = f'regularizers[{index}] ({name})'
  unknown = sorted(set(entry) - set(_ENTRY_KEYS) - set(spec.options))
  if unknown:
    raise errors.UserError(f'{where}: unknown option(s) {unknown}; valid: '
                     f'{sorted(set(_ENTRY_KEYS) | set(spec.options))}.')
  if 'weight' not in entry:
    raise errors.UserError(f'{where}: missing weight (the lambda multiplying this term).')
  weight = entry['weight']
  if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)):
    raise errors.UserError(f'{where}: weight must be a number, got {weight!r}.')
  if 'layers' in entry:
    layers = entry['layers']
  elif spec.default_layers is not None:
    layers = spec.default_layers
  else:
    raise errors.UserError(f'{where}: missing layers (block indices, e.g. layers=(0,); the ARViT '
                     'paper regularizes one block, L1..L6).')
  options = {**spec.options, **{k: v for k, v in entry.items() if k in spec.options}}
  for key, choices in _CHOICES.items():
    if key in options:
      check_choice(f'{where} option {key}', options[key], choices)
  return _Term(name=entry.get('tag') or name, regularizer=name, weight=float(weight),
               layers=_resolve_layers(layers, depth, where), options=options)


def _unique_names(terms: list[_Term]) -> list[_Term]:
  counts = {}
  for t in terms:
    counts[t.name] = counts.get(t.name, 0) + 1
  out, seen = [], set()
  for t in terms:
    name = t.name
    if counts[name] > 1:
      name = f"{name}_l{'_'.join(map(str, t.layers))}"
    base, k = name, 2
    while name in seen:
      name, k = f'{base}_{k}', k + 1
    seen.add(name)
    out.append(dataclasses.replace(t, name=name))
  return out


class Regularizer:
  """The configured regularizers bound to a model: one call gives logits and penalties.

  Attributes:
    terms_config: the parsed terms (name, regularizer, weight, resolved layers, options).
    attention_layers: blocks whose attention is computed explicitly (softmax
      materialized): the layers of every distance/similarity term and, when DIV is on,
      every block from the first DIV layer to the last block, because DIV's double
      backprop needs second derivatives there, which fused kernels (cuDNN flash attention)
      do not provide. All other blocks keep the fused path.
    div_layers: blocks whose heads get their own input copies.
  """

  def __init__(self, terms: Sequence[_Term], model):
    self.terms_config = tuple(terms)
    self.model = model
    attn = {l for t in terms if t.regularizer != 'div' for l in t.layers}
    div = {l for t in terms if t.regularizer == 'div' for l in t.layers}
    if div:
      attn |= set(range(min(div), model.depth))
    self.attention_layers = tuple(sorted(attn))
    self.div_layers = tuple(sorted(div))

  def __repr__(self):
    parts = ', '.join(f'{t.name}: {t.weight} x {t.regularizer}{list(t.layers)}'
                      for t in self.terms_config)
    return f'Regularizer({parts})'

  def _term_value(self, term, out, grads, images, layout):
    gh, gw, prefix = layout
    values = []
    for layer in term.layers:
      if term.regularizer == 'div':
        values.append(div_loss(grads[layer], normalize=term.options['normalize'],
                               reduction=term.options['reduction']))
        continue
      block = out.get(f'block{layer}', {}) if isinstance(out, Mapping) else {}
      if 'attn' not in block:
        raise ValueError(f"term {term.name!r}: the model output has no out['block{layer}']"
                         "['attn']; the model must return attention maps for the blocks "
                         'in capture_attention (docs/design.md, Models).')
      opts = dict(term.options)
      if term.regularizer == 'distance':
        values.append(distance_loss(block['attn'], (gh, gw), num_prefix_tokens=prefix,
                                    **opts))
      else:
        values.append(similarity_loss(block['attn'], images, (gh, gw),
                                      num_prefix_tokens=prefix, **opts))
    return functools.reduce(jnp.add, values)

  def __call__(self, variables, images, *, labels=None, train: bool = False, rngs=None,
               head_mask=None, mutable=False):
    """Forward pass plus every configured penalty.

    Args:
      variables: the model's variables ({'params': ..., maybe 'batch_stats': ...}).
      images: `[B, H, W, C]`.
      labels: `[B]` int labels (only DIV with target='label_logit' reads them).
      train: forwarded to the model (dropout, batch norm).
      rngs: forwarded to `model.apply` (e.g. {'dropout': key}).
      head_mask: `[depth, heads]` or None, forwarded.
      mutable: forwarded (e.g. ['batch_stats'] when training BatchNorm models).

    Returns:
      `(logits, out, reg_total, terms, new_state)`: `terms` maps each term name to its
      unweighted float32 value, `reg_total = sum_t weight_t * terms[t]` (0.0 without
      terms), `new_state` the dict of mutated collections ({} when mutable is False).
    """
    variables = strip_perturbations(variables)
    kwargs = dict(train=train)
    if head_mask is not None:
      kwargs['head_mask'] = head_mask
    if self.attention_layers:
      kwargs['capture_attention'] = self.attention_layers
    if rngs is not None:
      kwargs['rngs'] = rngs
    grads = {}
    if self.div_layers:
      div_terms = [t for t in self.terms_config if t.regularizer == 'div']
      targets = {t.options['target'] for t in div_terms}
      if len(targets) > 1:
        raise ValueError(f'all DIV terms must share one target, got {sorted(targets)}.')
      grads, logits, out, new_state = div_head_input_grads(
          self.model, variables, images, div_layers=self.div_layers, target=targets.pop(),
          labels=labels, mutable=mutable, **kwargs)
    else:
      result = self.model.apply(variables, images, mutable=mutable, **kwargs)
      (logits, out), new_state = result if mutable else (result, {})
      new_state = dict(new_state)
    layout = (self.model.token_layout(images.shape[1:3])
              if any(t.regularizer != 'div' for t in self.terms_config) else (0, 0, 0))
    terms = {t.name: self._term_value(t, out, grads, images, layout)
             for t in self.terms_config}
    reg_total = jnp.zeros((), jnp.float32)
    for t in self.terms_config:
      reg_total = reg_total + t.weight * terms[t.name]
    return logits, out, reg_total, terms, new_state


def is_attention_model(model) -> bool:
  """True for a model (class or instance) whose blocks expose attention maps to the
  regularizers: the ViT-like models, which map tokens to the patch grid (`token_layout`)."""
  return callable(getattr(model, 'token_layout', None))


def check_attention_model(config_list, model_name: str, model) -> None:
  """Raises a ValueError unless `model` can carry the regularizers of `config_list`.

  ResNet has no attention and AlterNet's convolutional-stage MSAs do not expose the
  per-block attention maps of docs/design.md: both must fail here, naming the problem,
  rather than later inside the regularizer with an unrelated error.
  """
  if is_attention_model(model):
    return
  names = [dict(e).get('name') for e in config_list]
  valid = sorted(n for n, cls in models.MODELS.items() if is_attention_model(cls))
  raise errors.UserError(
      f'Attention regularizers {names} need an attention model whose blocks expose their '
      f'attention maps ({valid}); model {model_name!r} has none. Set config.model_name to '
      f'one of {valid}, or remove config.regularizers.')


def build(config_list: Optional[Sequence[Mapping[str, Any]]], model) -> Regularizer:
  """Parses `config.regularizers` and binds it to `model` (docs/design.md, Regularizers).

  Each entry: `dict(name='div'|'distance'|'similarity', weight=float, layers=(int, ...),
  tag=optional term name, **options)`. Options and defaults (paper's definition first):
    div: target='max_logit'|'max_prob'|'label_logit', normalize=False, reduction='sum'|
      'mean'; layers default (-1,) (the last block, as in the authors' code).
    distance: penalty='normalized'|'smooth_sign'|'offset', alpha=4, beta=0.5, gamma=0.1,
      per_head=False, normalize_attention=False, bias=0, log=False,
      batch_reduction='mean'|'sum'; layers required.
    similarity: region_size=None, metric='mse'|'minkowski', p=0.1, eps=1e-6,
      normalize_similarity=False, per_head, normalize_attention, bias, log,
      batch_reduction; layers required.
  Layers are 0-based block indices; negative ones count from the end. A term over several
  layers is the sum over its layers. Term names: the regularizer's name (or `tag`); if
  several entries share a name, `_l<layers>` is appended ('distance_l0', 'distance_l2').

  Args:
    config_list: the list of entries (ConfigDicts or dicts); None or [] for plain ERM.
    model: the Flax module (attention models expose `depth`).

  Returns:
    a `Regularizer`.

  Raises:
    ValueError: unknown name or option, bad choice, missing weight/layers, a layer out
      of range, or a model without attention blocks.
  """
  entries = list(config_list or [])
  if entries:
    check_attention_model(entries, type(model).__name__, model)
  depth = int(model.depth) if entries else 0
  terms = [_parse_entry(i, e, depth) for i, e in enumerate(entries)]
  return Regularizer(_unique_names(terms), model)
