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

from vitreg_jax import models
from vitreg_jax.checks import check_choice
from vitreg_jax.checks import resolve_layers
from vitreg_jax.errors import UserError
from vitreg_jax.regularizers import registry
from vitreg_jax.regularizers.div import div_head_input_grads, strip_perturbations
from vitreg_jax.regularizers.registry import RegularizerSpec

# The registry (name -> RegularizerSpec): the package's regularizers and the user's.
REGULARIZERS = registry.REGISTRY


@dataclasses.dataclass(frozen=True)
class _Term:
  name: str        # unique key in `terms`
  spec: RegularizerSpec
  weight: float
  layers: tuple[int, ...]
  options: Mapping[str, Any]

  @property
  def regularizer(self) -> str:
    """The registered name of the term's regularizer."""
    return self.spec.name


def _resolve_layers(layers, depth: int, where: str) -> tuple[int, ...]:
  """`checks.resolve_layers`, plus what a term needs: at least one block, none twice."""
  if isinstance(layers, str):  # A config's layers are ints, never the command line's text.
    raise UserError(f'{where}: layers {layers!r} is not a tuple of ints.')
  try:
    resolved = resolve_layers(layers, depth, where)
  except ValueError as e:
    raise UserError(str(e)) from None
  if not resolved:
    raise UserError(f'{where}: layers is empty; give at least one block index.')
  if len(set(resolved)) != len(resolved):
    raise UserError(f'{where}: layers {tuple(layers)} name the same block twice.')
  return resolved


def _options(spec: RegularizerSpec, entry: Mapping[str, Any], where: str) -> dict:
  """The spec's defaults overridden by the entry's options, each checked against its choices."""
  options = {**spec.options, **{k: v for k, v in entry.items() if k in spec.options}}
  for key, choices in spec.choices.items():
    try:
      check_choice(f'{where} option {key}', options[key], choices)
    except ValueError as e:
      raise UserError(str(e)) from None
  return options


def _check_entry(index: int, entry: Mapping[str, Any]) -> tuple[_Term, Any, str]:
  """Everything of an entry that needs no model: `(term without layers, its layers, where)`."""
  entry = dict(entry)
  name = entry.get('name')
  spec = registry.get(name, where=f'regularizers[{index}]')
  where = f'regularizers[{index}] ({name})'
  unknown = sorted(set(entry) - set(registry.ENTRY_KEYS) - set(spec.options))
  if unknown:
    raise UserError(f'{where}: unknown option(s) {unknown}; valid: '
                    f'{sorted(set(registry.ENTRY_KEYS) | set(spec.options))}.')
  if 'weight' not in entry:
    raise UserError(f'{where}: missing weight (the lambda multiplying this term).')
  weight = entry['weight']
  if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)):
    raise UserError(f'{where}: weight must be a number, got {weight!r}.')
  if 'layers' in entry:
    layers = entry['layers']
  elif spec.default_layers is not None:
    layers = spec.default_layers
  else:
    raise UserError(f'{where}: missing layers (block indices, e.g. layers=(0,)); this '
                    'regularizer has no default blocks.')
  term = _Term(name=entry.get('tag') or name, spec=spec, weight=float(weight), layers=(),
               options=_options(spec, entry, where))
  return term, layers, where


def _parse_entry(index: int, entry: Mapping[str, Any], depth: int) -> _Term:
  term, layers, where = _check_entry(index, entry)
  return dataclasses.replace(term, layers=_resolve_layers(layers, depth, where))


def check_config(config_list: Optional[Sequence[Mapping[str, Any]]]) -> None:
  """Checks `config.regularizers` without a model: names (the registered ones), options,
  choices and weights; `build` checks the layers against the model's depth.

  `config_lib.with_defaults` calls it, so a mistake there is reported before any compute.

  Raises:
    UserError: as `build`, but for the layers.
  """
  for index, entry in enumerate(config_list or []):
    _check_entry(index, entry)


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


def _grad_target(terms: Sequence[_Term]) -> Optional[str]:
  """The one `p*` of the terms needing per-head input gradients (one vjp computes them all)."""
  targets = {t.options[registry.GRAD_TARGET_OPTION] for t in terms
             if registry.HEAD_INPUT_GRADS in t.spec.needs}
  if len(targets) > 1:
    names = [t.name for t in terms if registry.HEAD_INPUT_GRADS in t.spec.needs]
    raise UserError(f'terms {names} need per-head input gradients, computed in one pass: '
                    f'they must share one target, got {sorted(targets)}.')
  return targets.pop() if targets else None


class Regularizer:
  """The configured regularizers bound to a model: one call gives logits and penalties.

  Attributes:
    terms_config: the parsed terms (name, spec, weight, resolved layers, options).
    attention_layers: blocks whose attention is computed explicitly (softmax
      materialized), derived from the terms' needs (`registry.explicit_attention_layers`):
      the blocks whose maps a term reads and, with per-head input gradients (DIV), every
      block from the first such block to the last, because the double backprop needs
      second derivatives there, which fused kernels (cuDNN flash attention) do not provide.
      All other blocks keep the fused path.
    div_layers: blocks whose heads get their own input copies (terms needing
      `registry.HEAD_INPUT_GRADS`).
  """

  def __init__(self, terms: Sequence[_Term], model):
    self.terms_config = tuple(terms)
    self.model = model
    layers_by_need = {need: {l for t in terms if need in t.spec.needs for l in t.layers}
                      for need in registry.NEEDS}
    self.attention_layers = registry.explicit_attention_layers(
        layers_by_need, int(model.depth) if terms else 0)
    self.div_layers = tuple(sorted(layers_by_need[registry.HEAD_INPUT_GRADS]))
    self._grad_target = _grad_target(self.terms_config)

  def __repr__(self):
    parts = ', '.join(f'{t.name}: {t.weight} x {t.regularizer}{list(t.layers)}'
                      for t in self.terms_config)
    return f'Regularizer({parts})'

  def _term_value(self, term, out, grads, images, labels):
    values = [term.spec.fn(registry.LayerContext(
        term=term.name, layer=layer, out=out, images=images, labels=labels,
        head_input_grads=grads.get(layer), model=self.model), **term.options)
              for layer in term.layers]
    return functools.reduce(jnp.add, values)

  def __call__(self, variables, images, *, labels=None, train: bool = False, rngs=None,
               head_mask=None, mutable=False):
    """Forward pass plus every configured penalty.

    Args:
      variables: the model's variables ({'params': ..., maybe 'batch_stats': ...}).
      images: `[B, H, W, C]`.
      labels: `[B]` int labels, or None: `p*` of DIV's target='label_logit' needs them;
        every term's context carries them.
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
      grads, logits, out, new_state = div_head_input_grads(
          self.model, variables, images, div_layers=self.div_layers,
          target=self._grad_target, labels=labels, mutable=mutable, **kwargs)
    else:
      result = self.model.apply(variables, images, mutable=mutable, **kwargs)
      (logits, out), new_state = result if mutable else (result, {})
      new_state = dict(new_state)
    terms = {t.name: self._term_value(t, out, grads, images, labels)
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
  """Raises a UserError unless `model` can carry the regularizers of `config_list`.

  ResNet has no attention and AlterNet's convolutional-stage MSAs do not expose the
  per-block attention maps of docs/design.md: both must fail here, naming the problem,
  rather than later inside the regularizer with an unrelated error.
  """
  if is_attention_model(model):
    return
  names = [dict(e).get('name') for e in config_list]
  valid = sorted(n for n, cls in models.MODELS.items() if is_attention_model(cls))
  raise UserError(
      f'Attention regularizers {names} need an attention model whose blocks expose their '
      f'attention maps ({valid}); model {model_name!r} has none. Set config.model_name to '
      f'one of {valid}, or remove config.regularizers.')


def build(config_list: Optional[Sequence[Mapping[str, Any]]], model) -> Regularizer:
  """Parses `config.regularizers` and binds it to `model` (docs/design.md, Regularizers).

  Each entry: `dict(name=<a registered name>, weight=float, layers=(int, ...), tag=optional
  term name, **options)`; `name` is looked up in the registry (`registry.get`), whose spec
  gives the valid options, their defaults and choices, and the default layers. The
  package's own, with their options and defaults (paper's definition first):
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
    UserError: unknown name (listing the registered ones) or option, bad choice, missing
      weight/layers, a layer out of range, DIV terms with different targets, or a model
      without attention blocks.
  """
  entries = list(config_list or [])
  if entries:
    check_attention_model(entries, type(model).__name__, model)
  depth = int(model.depth) if entries else 0
  terms = [_parse_entry(i, e, depth) for i, e in enumerate(entries)]
  return Regularizer(_unique_names(terms), model)
