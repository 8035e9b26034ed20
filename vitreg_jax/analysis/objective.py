r"""The objective the analyses study: the loss the run trained with, over a flat parameter vector.

"How do ViTs work?" analyses the training loss (the authors' README: Hessians and loss
landscapes "with L2 regularization on augmented datasets"). For a run that is

  L(w; batch) = CE(f_w(mix(x)), smooth(mix(y))) + L2(w)

* `mix`: the batch's Mixup/CutMix recipe (`config.data.mixup`), applied by the train step's
  own `data.mixing.apply`; the training iterator draws it from (seed, step) and attaches it
  to the batch, so an analysed batch is mixed exactly as training mixed that step's batch.
* `smooth`: `config.label_smoothing`; CE is the training objective's cross-entropy
  (`training.objective.Objective.cross_entropy`, which also mixes: `inputs`). A run trained
  with another registered loss (GroupDRO) is analysed under this cross-entropy too.
* `L2` (`--l2`, `L2_FORMS`), wd = `optimizer.weight_decay`:
  - `authors` (default; the commands that use it, hessian and landscape, reproduce the
    authors' figures): `wd * sum_t ||w_t||_2`, the sum of the *unsquared* L2 norms of every
    parameter tensor t of the model, biases, LayerNorm / BatchNorm scales and offsets,
    embeddings and the class token included (BatchNorm's running statistics are not
    parameters). That is the authors' `ops/norm.py`, `l2` (`torch.norm` of every tensor of
    `model.parameters()`, summed), which `losslandscape.ipynb` adds as
    `loss = NLL + weight_decay * l2`. Its Hessian is block-diagonal, per tensor
    `wd (I - u u^T) / ||w_t||` (u = w_t / ||w_t||): positive semi-definite, of size
    `wd / ||w_t||`, zero along w_t itself. The norm is not differentiable at w_t = 0 (a
    zero-initialized head at step 0): there `safe_norm` takes gradient and Hessian 0, the
    subgradient PyTorch's `torch.norm` backward also returns at 0.
  - `squared`: `wd / 2 * sum w^2` over the decayed parameters, whose gradient `wd * w` is the
    coupled weight decay of `optim.make_optimizer` (`optimizer.weight_decay` on kernels and
    embeddings, every parameter with `decay_1d_params`). Its Hessian is `wd` times the 0/1
    diagonal of the decayed parameters (`wd * I` with `decay_1d_params`): it shifts every
    eigenvalue of a decayed block up by wd and hides negative ones smaller than wd.
  - `none`: CE alone.
  AdamW's decoupled decay is not the gradient of a loss; the analyses add one of these terms
  for it, as the authors do.
* `--augment_loss=false` drops mixing and smoothing (plain NLL of the training batches, which
  keep the pipeline's crop / flip / RandAugment); the L2 term stays.

The model runs in inference mode (BatchNorm's running statistics, no dropout or stochastic
depth), so L is a deterministic function of (w, batch). Regularizer terms (DIV, attention
maps) are not part of it: the paper's objective is NLL + L2.

`Objective.restrict(regex)` keeps the other parameters fixed and exposes only the matching
ones as the flat vector (a parameter subset's Hessian is the exact diagonal block of the
full one; the fixed parameters' L2 terms are constants); `Objective.with_l2(form)` is the
same objective with another L2 term (the Hessian command's pair with and without it);
`param_blocks` names each model's blocks (MSA, MLP, Conv) for `--per_block`.
"""

import re
from typing import Optional, Sequence

from absl import flags
from flax import traverse_util
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax.analysis import runs
from vitreg_jax.data import mixing
from vitreg_jax.training import objective as training_objective


L2_FORMS = ("authors", "squared", "none")

_FLAG_SPECS = [
    (flags.DEFINE_bool, "augment_loss", True, "Analyse the run's training loss with its "
     "Mixup/CutMix and label smoothing (false: the plain NLL of the training batches; the L2 "
     "weight penalty stays either way)."),
    (flags.DEFINE_enum, "l2", "authors", L2_FORMS, "The objective's L2 term: authors: "
     "weight_decay * sum of the unsquared L2 norms of every parameter tensor (their "
     "ops/norm.py); squared: weight_decay / 2 * |w|^2 over the decayed parameters (the "
     "gradient of coupled weight decay); none: no L2 term."),
]


def define_flags() -> None:
  """`--augment_loss` and `--l2`, for the commands that analyse the training loss (hessian,
  landscape)."""
  runs.define_once(_FLAG_SPECS)


def l2_penalty(params, weight_decay: float, decay_1d: bool = False):
  """The `squared` form: `wd / 2 * sum w^2` over the decayed parameters (ndim >= 2 unless
  `decay_1d`)."""
  leaves = [p for p in jax.tree.leaves(params) if decay_1d or p.ndim >= 2]
  return 0.5 * weight_decay * sum(jnp.sum(jnp.square(p)) for p in leaves)


def safe_norm(x):
  """`||x||_2` whose gradient and Hessian at x = 0 are 0 (the norm's subgradient there, as
  PyTorch's `torch.norm` backward returns), not NaN: the square root only ever sees s > 0."""
  s = jnp.sum(jnp.square(x))
  positive = s > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def norm_sum(params):
  """`sum_t ||w_t||_2` over every parameter tensor: the authors' `ops/norm.py` `l2`."""
  return sum(safe_norm(p) for p in jax.tree.leaves(params))


def l2_term(params, weight_decay: float, form: str = "authors", decay_1d: bool = False):
  """The objective's L2 term in one of `L2_FORMS` (module docstring).

  Args:
    params: the full parameter tree. weight_decay: wd. decay_1d: which tensors the
      `squared` form decays (the `authors` form covers every tensor, as theirs does).
  """
  if form == "authors":
    return weight_decay * norm_sum(params)
  if form == "squared":
    return l2_penalty(params, weight_decay, decay_1d)
  if form == "none":
    return jnp.float32(0.0)
  raise errors.UserError(f"l2 must be one of {L2_FORMS}, got {form!r}.")


def describe_l2(form: str, weight_decay: float) -> str:
  """The objective in words, for hessian.json / landscape.json and plot titles."""
  return {"authors": f"CE + {weight_decay:g} * sum_t ||w_t||_2",
          "squared": f"CE + {weight_decay:g} / 2 * |w|^2",
          "none": "CE (no L2)"}[form]


def _flat(params) -> dict:
  return traverse_util.flatten_dict(params, sep="/")


class Objective:
  """The training loss as a function of a flat fp32 vector of (a subset of) the parameters.

  Attributes:
    theta: the flat vector at the trained point (the selected parameters only).
    names: the selected parameters' paths (`Transformer/encoderblock_0/...`).
    l2: the L2 term's form (`L2_FORMS`); weight_decay: its wd.
  """

  def __init__(self, model, variables, *, num_classes: int, weight_decay: float = 0.0,
               decay_1d: bool = False, label_smoothing: float = 0.0, augment: bool = True,
               names: Optional[Sequence[str]] = None, l2: str = "authors"):
    if l2 not in L2_FORMS:
      raise errors.UserError(f"l2 must be one of {L2_FORMS}, got {l2!r}.")
    self.model, self.num_classes, self.l2 = model, num_classes, l2
    self.weight_decay, self.decay_1d = float(weight_decay), bool(decay_1d)
    self.label_smoothing = float(label_smoothing) if augment else 0.0
    self.augment = bool(augment)
    # The training objective's mixing and cross-entropy (no regularizer terms: see above).
    self._training = training_objective.Objective(model, num_classes=num_classes,
                                                  label_smoothing=self.label_smoothing)
    self._variables = variables
    self.state = {k: v for k, v in variables.items() if k != "params"}
    flat = {k: jnp.asarray(v, jnp.float32) for k, v in _flat(variables["params"]).items()}
    self.names = tuple(sorted(flat) if names is None else names)
    if not self.names:
      raise errors.UserError("The parameter selection is empty.")
    self._fixed = {k: v for k, v in flat.items() if k not in self.names}
    self.theta, self._unravel = ravel_pytree({k: flat[k] for k in self.names})

  def restrict(self, regex: str) -> "Objective":
    """The same objective over the parameters whose path matches `regex` (re.search).

    Raises:
      ValueError: no parameter matches (the message lists some paths to choose from).
    """
    pattern = re.compile(regex)
    names = [n for n in self.names if pattern.search(n)]
    if not names:
      raise errors.UserError(
          f"--params={regex!r} matches none of the model's parameters; paths look "
          f"like {list(self.names[:4])} (see `param_blocks`).")
    return self._replace(names=names)

  def with_l2(self, form: str) -> "Objective":
    """The same objective (parameters, batches, CE) with the L2 term `form` instead."""
    return self._replace(l2=form)

  def _replace(self, **changes) -> "Objective":
    kwargs = dict(num_classes=self.num_classes, weight_decay=self.weight_decay,
                  decay_1d=self.decay_1d, label_smoothing=self.label_smoothing,
                  augment=self.augment, names=self.names, l2=self.l2)
    return Objective(self.model, self._variables, **{**kwargs, **changes})

  @property
  def description(self) -> str:
    """The objective in words (`describe_l2`)."""
    return describe_l2(self.l2, self.weight_decay)

  def mask(self, regex: str):
    """A 0/1 vector like `theta`: 1 on the selected parameters whose path matches `regex`."""
    pattern = re.compile(regex)
    shapes = {k: v.shape for k, v in self._unravel(self.theta).items()}
    # NumPy float32 leaves: a strong dtype, as the whole model's `ones`, so every block and
    # the whole model share one compilation (a weakly typed mask would recompile).
    mask, _ = ravel_pytree({k: np.full(shapes[k], float(bool(pattern.search(k))), np.float32)
                            for k in self.names})
    return mask

  def params(self, theta):
    """The full parameter tree with the selected parameters set from `theta`."""
    return traverse_util.unflatten_dict({**self._fixed, **self._unravel(theta)}, sep="/")

  def inputs(self, batch: dict):
    """`(images, soft targets)`: the batch mixed by its recipe (when augmenting), as in training."""
    if not self.augment:
      batch = {k: v for k, v in batch.items() if k not in mixing.BATCH_KEYS}
    return self._training.inputs(batch)

  def logits(self, theta, images):
    """The model's fp32 logits in inference mode at parameters `theta`."""
    logits, _ = self.model.apply({"params": self.params(theta), **self.state}, images,
                                 train=False)
    return logits.astype(jnp.float32)

  def data_loss(self, logits, targets):
    """The training cross-entropy (with label smoothing) of `logits` against soft targets."""
    return self._training.cross_entropy(logits, targets)

  def penalty(self, theta):
    """The L2 term (`l2_term` of form `self.l2`) of all parameters (fixed ones included: a
    constant in theta)."""
    return l2_term(self.params(theta), self.weight_decay, self.l2, self.decay_1d)

  def loss(self, theta, batch):
    """The training loss `CE + L2` of one batch at `theta`."""
    images, targets = self.inputs(batch)
    return self.data_loss(self.logits(theta, images), targets) + self.penalty(theta)

  def measure(self, theta, batch) -> dict:
    """`loss`, `ce`, `l2` and `accuracy` (argmax vs the batch's labels, as in training)."""
    images, targets = self.inputs(batch)
    logits = self.logits(theta, images)
    ce, l2 = self.data_loss(logits, targets), self.penalty(theta)
    return {"loss": ce + l2, "ce": ce, "l2": l2,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def from_run(run, *, augment: bool = True, params: Optional[str] = None,
             l2: str = "authors") -> Objective:
  """The objective of a `rundir.Run`: its weight decay, label smoothing and mixing.

  Args:
    run: the loaded run (config, model, variables).
    augment: Mixup/CutMix and label smoothing as configured (False: plain NLL + L2).
    params: an optional regex restricting the vector to a parameter subset.
    l2: the L2 term's form (`L2_FORMS`).
  """
  opt = run.config.get("optimizer", {}) or {}
  obj = Objective(run.model, run.variables, num_classes=run.num_classes,
                  weight_decay=float(opt.get("weight_decay", 0.0)),
                  decay_1d=bool(opt.get("decay_1d_params", False)),
                  label_smoothing=float(run.config.get("label_smoothing", 0.0) or 0.0),
                  augment=augment, l2=l2)
  return obj.restrict(params) if params else obj


_VIT_BLOCK = re.compile(r"^(.*encoderblock_(\d+))/([^/]+)/")
_CNN_BLOCK = re.compile(r"^stage(\d+)_block(\d+)/")


def _vit_sub_block(module: str) -> str:
  """The MSA sub-block holds the first LayerNorm and the attention; the MLP one the rest."""
  return "msa" if module == "LayerNorm_0" or "Attention" in module else "mlp"


def param_blocks(names: Sequence[str]) -> list:
  """The model's blocks in depth order as `(label, kind, regex)`.

  ViTs (`encoderblock_i`): an `msa` sub-block (pre-norm + attention) and an `mlp` one per
  block. ResNet / AlterNet (`stage{s}_block{b}`): one entry per block, `msa` if it holds an
  attention layer (AlterNet's MSA blocks) else `conv`. Embeddings, stems, norms and heads are
  left out. Raises ValueError for a model with no such blocks.
  """
  found = {}
  for name in names:
    if m := _VIT_BLOCK.match(name):
      kind = _vit_sub_block(m.group(3))
      key = (int(m.group(2)), 0 if kind == "msa" else 1)
      prefix = re.escape(m.group(1))
      modules = "LayerNorm_0|[^/]*Attention[^/]*" if kind == "msa" else "LayerNorm_1|MlpBlock_0"
      found[key] = (f"block{m.group(2)}/{kind}", kind, f"^{prefix}/({modules})/")
    elif m := _CNN_BLOCK.match(name):
      key = (int(m.group(1)), int(m.group(2)))
      msa = "attention" in name or (key in found and found[key][1] == "msa")
      found[key] = (f"stage{key[0]}_block{key[1]}", "msa" if msa else "conv",
                    f"^stage{key[0]}_block{key[1]}/")
  if not found:
    raise errors.UserError(
        "--per_block: no ViT encoder blocks or ResNet/AlterNet stage blocks among "
        f"the parameters (e.g. {list(names[:3])}); use --params=REGEX instead.")
  return [found[k] for k in sorted(found)]
