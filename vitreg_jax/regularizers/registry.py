"""The regularizer registry: a regularizer is one `RegularizerSpec`, looked up by name.

A spec says everything the training wrapper (`wrapper.build`) and the balance check
(`training/loss_balance.py`) need to know, so neither ever tests a regularizer's name:

* its `name` (what `config.regularizers` entries give) and its `options`, with their
  defaults and, where an option takes one of a few values, its valid `choices`;
* its `default_layers` (None: every entry must give `layers`);
* what it `needs` from the forward pass (`ATTENTION`, `HEAD_INPUT_GRADS`): the wrapper derives
  from them which blocks compute explicit attention and how to run the forward pass;
* its function `fn(ctx, **options)`: the term's value at one block, from a `LayerContext`
  (a term over several blocks is the sum over them);
* whether the balance check refuses the term when it is negligible, and the fix to print.

The package's own specs are registered by the modules that define them (`div.SPEC`,
`attention_maps.DISTANCE`, `attention_maps.SIMILARITY`). A user adds one from outside the
package the same way, `regularizers.register(MY_SPEC)`, and names it in a config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax

from vitreg_jax import registry as registry_lib
from vitreg_jax.errors import UserError

Array = jax.Array

# What a regularizer can need from the forward pass (the model contract of docs/design.md).
# ATTENTION: the attention probabilities `out['block{l}']['attn']` `[B, H, T, T]` of the
#   term's blocks, which then compute explicit softmax attention instead of the fused kernel.
ATTENTION = 'attention'
# HEAD_INPUT_GRADS: the per-head input gradients `[B, H, N, D]` of `p*` at the term's blocks
#   (`div.div_head_input_grads`: the forward pass runs under one `jax.vjp`). `p*` is the
#   term's option `target` (`div.prediction_target`), one per forward pass, so all terms with
#   this need share it. The training loss differentiates through these gradients (double
#   backprop), which needs second derivatives from the first such block to the last, and
#   fused attention kernels (cuDNN flash attention) have none: those blocks compute explicit
#   attention too.
HEAD_INPUT_GRADS = 'head_input_grads'
NEEDS = (ATTENTION, HEAD_INPUT_GRADS)
# The option of a HEAD_INPUT_GRADS term that names `p*`.
GRAD_TARGET_OPTION = 'target'

# Keys of a config entry that are not the regularizer's options.
ENTRY_KEYS = ('name', 'weight', 'layers', 'tag')


def explicit_attention_layers(layers_by_need: Mapping[str, set], depth: int
                              ) -> tuple[int, ...]:
  """Blocks that must compute explicit attention, given the blocks each need is used at."""
  blocks = set(layers_by_need.get(ATTENTION, ()))
  grads = layers_by_need.get(HEAD_INPUT_GRADS, ())
  if grads:
    blocks |= set(range(min(grads), depth))
  return tuple(sorted(blocks))


@dataclasses.dataclass(frozen=True)
class LayerContext:
  """What a term's function reads at one of its blocks (computed by the wrapper's call).

  Attributes:
    term: the term's name (for error messages).
    layer: the 0-based block index.
    out: the model's `out` dict (docs/design.md, Models).
    images: `[B, H, W, C]` the model's input.
    labels: `[B]` int labels, or None when the caller gave none.
    head_input_grads: `[B, H, N, D]` at this block when the spec needs HEAD_INPUT_GRADS,
      else None.
    model: the Flax module (for `token_layout`).
  """
  term: str
  layer: int
  out: Any
  images: Array
  labels: Optional[Array]
  head_input_grads: Optional[Array]
  model: Any

  @property
  def block(self) -> Mapping[str, Array]:
    """`out['block{layer}']` ({} when the model has none)."""
    return self.out.get(f'block{self.layer}', {}) if isinstance(self.out, Mapping) else {}

  @property
  def attn(self) -> Array:
    """`[B, H, T, T]` attention probabilities of this block (needs ATTENTION)."""
    block = self.block
    if 'attn' not in block:
      raise ValueError(f"term {self.term!r}: the model output has no out['block{self.layer}']"
                       "['attn']; the model must return attention maps for the blocks in "
                       'capture_attention (docs/design.md, Models).')
    return block['attn']

  @property
  def grid_hw(self) -> tuple[int, int]:
    """The patch grid `(grid_h, grid_w)` of `images` (`model.token_layout`)."""
    gh, gw, _ = self.model.token_layout(self.images.shape[1:3])
    return gh, gw

  @property
  def num_prefix_tokens(self) -> int:
    """Leading non-patch tokens (CLS) in front of the patch tokens."""
    return self.model.token_layout(self.images.shape[1:3])[2]


@dataclasses.dataclass(frozen=True)
class RegularizerSpec:
  """One regularizer: its config name and options, what it needs, and its function.

  Attributes:
    name: what a `config.regularizers` entry's `name` gives; the default term name.
    fn: `fn(ctx: LayerContext, **options) -> float32 scalar`, the term's value at one block
      (every option is passed, defaults filled in).
    options: every option with its default.
    choices: for an option that takes one of a few values, the valid ones.
    default_layers: block indices when an entry gives none; None: `layers` is required.
    needs: a subset of NEEDS (module comments say what each gives and costs).
    refuse_if_negligible: the balance check stops training when the weighted term's
      gradient is negligible against cross-entropy's (training/loss_balance.py).
    negligible_fix: the fix the refusal message names first (it always adds "raise its
      weight"), e.g. "use the normalized form (normalize=True) or ".
  """
  name: str
  fn: Callable[..., Array]
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  choices: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
  default_layers: Optional[tuple[int, ...]] = None
  needs: frozenset = frozenset()
  refuse_if_negligible: bool = False
  negligible_fix: str = ''

  def __post_init__(self):
    where = f'RegularizerSpec {self.name!r}'
    if not isinstance(self.name, str) or not self.name:
      raise UserError(f'RegularizerSpec name must be a non-empty string, got {self.name!r}.')
    if not callable(self.fn):
      raise UserError(f'{where}: fn must be callable as fn(ctx, **options), got {self.fn!r}.')
    object.__setattr__(self, 'needs', frozenset(self.needs))
    object.__setattr__(self, 'options', dict(self.options))
    object.__setattr__(self, 'choices', {k: tuple(v) for k, v in self.choices.items()})
    if self.default_layers is not None:
      object.__setattr__(self, 'default_layers', tuple(self.default_layers))
    _check_spec(self, where)


def _check_spec(spec: RegularizerSpec, where: str) -> None:
  """The spec's own consistency: a mistake here is its author's, reported at definition."""
  unknown = sorted(spec.needs - set(NEEDS))
  if unknown:
    raise UserError(f'{where}: unknown need(s) {unknown}; valid: {list(NEEDS)}.')
  clash = sorted(set(spec.options) & set(ENTRY_KEYS))
  if clash:
    raise UserError(f'{where}: option(s) {clash} collide with the entry keys {ENTRY_KEYS}.')
  stray = sorted(set(spec.choices) - set(spec.options))
  if stray:
    raise UserError(f'{where}: choices given for {stray}, which are not options.')
  for key, valid in spec.choices.items():
    if spec.options[key] not in valid:
      raise UserError(f'{where}: the default {key}={spec.options[key]!r} is not one of its '
                      f'choices {list(valid)}.')
  if HEAD_INPUT_GRADS in spec.needs and GRAD_TARGET_OPTION not in spec.options:
    raise UserError(f"{where}: a spec that needs {HEAD_INPUT_GRADS!r} must have the option "
                    f"{GRAD_TARGET_OPTION!r} (p*, see div.prediction_target).")


REGISTRY = registry_lib.Registry('regularizer', origin=lambda spec: spec.fn)


def register(spec: RegularizerSpec, *, replace: bool = False) -> RegularizerSpec:
  """Adds `spec` under `spec.name` (returns it, so a module can write `SPEC = register(...)`);
  the same definition again replaces it quietly, another one under a taken name is a
  `UserError` unless `replace` (vitreg_jax/registry.py)."""
  if not isinstance(spec, RegularizerSpec):
    raise UserError(f'register() takes a RegularizerSpec, got {type(spec).__name__}.')
  return REGISTRY.register(spec.name, spec, replace=replace)


def get(name: str, where: str = 'regularizers') -> RegularizerSpec:
  """The registered spec called `name`; `where` prefixes the error (e.g. 'regularizers[0]')."""
  if name not in REGISTRY:
    raise UserError(f'{where}: unknown regularizer name {name!r}; valid names: '
                    f'{sorted(REGISTRY)}.')
  return REGISTRY[name]
