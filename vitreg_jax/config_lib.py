"""Experiment config defaults, validation, and loading config files for the command line.

A config file's `get_config(arg)` returns an `ml_collections.ConfigDict` with any subset of the
top-level fields below; `with_defaults` fills in the rest (including the model's own fields
and the dataset's options) and rejects unknown fields, naming the valid ones, before any
compute is spent. Nested sections (`model`, `data`, `optimizer`, `schedule`, `regularizers`)
are validated by the module that consumes them.

On the command line (`vitreg_jax.main`), `load_config_file` fills every documented field in
*before* `--config.a.b=value` overrides are applied, so each of them has a typed target:

  --config=configs/quickstart.py:runlocal,dtype=bfloat16 --config.sharding.fsdp=True

`dtype=...` is a config argument every config file accepts (`COMMON_ARGS`): it sets
`config.model.dtype`.

Every config file imports this module, so it imports no jax: `models`, `optim`, `objective` and
`regularizers` (jax, flax, optax: about 4 s on the 2-core machine, against 0.8 s for this
module) are imported inside the functions that validate against them.
"""

import dataclasses
import importlib.util
import numbers
import os
import sys
import typing

from absl import flags
import ml_collections
from ml_collections import config_dict

from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax.data import base

DEFAULTS = dict(
    seed=0,
    model_name="vit",
    model={},                 # the model's own fields: models.create(model_name, **model)
    data={"name": "dominoes"},  # data.open(config.data)
    batch_size=128,           # global batch over all devices and processes
    eval_batch_size=None,     # default: batch_size
    total_steps=None,         # one of total_steps / total_epochs
    total_epochs=None,
    optimizer={"name": "adam", "lr": 1e-3},
    schedule={"name": "cosine", "warmup_steps": 0},
    label_smoothing=0.0,
    loss={"name": "ce"},      # 'ce' (ERM) | 'group_dro' (+ step_size, generalization_adjustment,
                              # normalize_loss) | a registered loss: vitreg_jax/training/losses.py
    regularizers=[],          # list of dict(name=..., weight=..., layers=..., **options)
    head_mask=None,           # optional [depth, heads] mask applied while training and
                              # evaluating: an array, or a head_mask.json / run dir path
    head_eval="",             # per-head figures at every eval: '' off, '-1', 'all', '0,3'
    init_from=None,           # dict(path, kind, step, reset_head); kind: 'checkpoint' | 'npz'
                              # | 'big_vision' | 'timm' | 'diverse_vit' (docs/finetuning.md)
    log_every_steps=50,
    eval_every_steps=500,
    checkpoint_every_steps=500,
    keep_checkpoints=3,
    sharding={"fsdp": False, "fsdp_min_size": 2**14},
    profile=False,            # trace a few steps into the TensorBoard profile plugin
    runlocal=False,           # set by configs for laptop-size runs (informational)
)


# Types of the top-level fields whose default is None (command-line overrides parse to these).
_NONE_TYPES = dict(eval_batch_size=int, total_steps=int, total_epochs=float, head_mask=object)
INIT_FROM_FIELDS = dict(path=str, kind=str, step=int, reset_head=bool)
# Sections whose absent fields mean "the consumer's default": listed for overrides as None.
_OPEN_SECTIONS = ("optimizer", "schedule", "init_from")
DTYPES = ("float32", "bfloat16", "float16")
COMMON_ARGS = dict(dtype="")  # Config arguments every config file accepts.


def _model_defaults(model_name: str) -> dict:
  """`{field: (default, type)}` of the model's own dataclass fields ({} for unknown names)."""
  from vitreg_jax import models  # pylint: disable=g-import-not-at-top
  cls = models.MODELS.get(model_name)
  if cls is None:
    return {}
  hints = typing.get_type_hints(cls)
  return {f.name: (f.default, _plain_type(hints.get(f.name)))
          for f in dataclasses.fields(cls)
          if f.name in models.field_names(cls) and f.name != "num_classes"
          and f.default is not dataclasses.MISSING}


def _plain_type(annotation) -> type:
  """int / float / str / bool / tuple for an annotation such as Optional[int], else object."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if typing.get_origin(annotation) is typing.Union and len(args) == 1:
    annotation = args[0]
  origin = typing.get_origin(annotation) or annotation
  if origin in (int, float, str, bool):
    return origin
  if origin in (tuple, list) or getattr(origin, "__name__", "") == "Sequence":
    return tuple
  return object


def _data_defaults(data_cfg: dict) -> dict:
  """The dataset's options with their defaults ({} for unknown dataset names)."""
  spec = data.DATASETS.get(data_cfg.get("name", base.COMMON_OPTIONS["name"]))
  return {} if spec is None else {**base.COMMON_OPTIONS, **spec.options}


def _open_section_fields(section: str) -> dict:
  from vitreg_jax.training import optim  # pylint: disable=g-import-not-at-top
  if section == "init_from":
    return INIT_FROM_FIELDS
  fields = optim._OPTIMIZER_FIELDS if section == "optimizer" else optim._SCHEDULE_FIELDS  # pylint: disable=protected-access
  return {f: object for f in fields}


def _merge(config) -> dict:
  """DEFAULTS overridden by `config`, model and data sections filled with their defaults."""
  unknown = sorted(set(config.keys()) - set(DEFAULTS))
  if unknown:
    raise errors.UserError(f"Unknown config field(s) {unknown}. Valid top-level fields: "
                           f"{sorted(DEFAULTS)}.")
  merged = dict(DEFAULTS)
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    merged[key] = value
  merged["model"] = {**{k: d for k, (d, _) in _model_defaults(merged["model_name"]).items()},
                     **merged["model"]}
  merged["data"] = {**_data_defaults(merged["data"]), **merged["data"]}
  merged["sharding"] = {**DEFAULTS["sharding"], **merged["sharding"]}
  from vitreg_jax.training import objective  # pylint: disable=g-import-not-at-top
  merged["loss"] = objective.resolve_loss(merged["loss"])
  return merged


def with_defaults(config) -> ml_collections.ConfigDict:
  """Returns a new ConfigDict: DEFAULTS overridden by `config`, after validating its keys.

  The model section gets every field of the model (`models.MODELS[model_name]`) and the data
  section every option of the dataset, so the saved config says exactly what ran. Fields of
  `optimizer`, `schedule` and `init_from` left None mean the consumer's default.

  Raises:
    errors.UserError: naming unknown top-level fields and listing the valid ones; a batch
      size or step interval that is not a positive integer; a regularizer entry the registry
      does not accept (name, option, choice, weight), or regularizers on a model without
      attention maps (e.g. `resnet`).
  """
  merged = _merge(config)
  for section in _OPEN_SECTIONS:
    if isinstance(merged[section], dict):
      merged[section] = {k: v for k, v in merged[section].items() if v is not None}
  if not merged["init_from"] or merged["init_from"].get("path") is None:
    merged["init_from"] = None
  if (merged["total_steps"] is None) == (merged["total_epochs"] is None):
    raise errors.UserError("Set exactly one of config.total_steps and config.total_epochs "
                           f"(got total_steps={merged['total_steps']}, "
                           f"total_epochs={merged['total_epochs']}).")
  _check_counts(merged)
  if merged["regularizers"]:
    _check_regularizers(merged["regularizers"], merged["model_name"])
  return ml_collections.ConfigDict(merged)


# Fields that count examples or steps: each a positive integer (None: the field's default).
POSITIVE_INTS = ("batch_size", "eval_batch_size", "log_every_steps", "eval_every_steps",
                 "checkpoint_every_steps")


def _check_counts(merged: dict) -> None:
  """A batch size or a step interval that is not a positive integer fails here, by name."""
  for key in POSITIVE_INTS:
    value = merged[key]
    if value is None and key == "eval_batch_size":
      continue
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise errors.UserError(f"config.{key} must be a positive integer, got {value!r}.")


def _check_regularizers(regularizer_configs, model_name: str) -> None:
  """An unknown regularizer name, option or choice (against the registered specs, the user's
  included), or a regularizer on a model without attention (e.g. `resnet`), fails here."""
  from vitreg_jax import models, regularizers  # pylint: disable=g-import-not-at-top
  regularizers.check_config(list(regularizer_configs))
  if model_name in models.MODELS:  # An unknown name is reported by models.create.
    regularizers.check_attention_model(list(regularizer_configs), model_name,
                                       models.MODELS[model_name])


_BOOLS = {"": True, "1": True, "true": True, "yes": True,
          "0": False, "false": False, "no": False}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument string `"key=value,key2=value2,flag"` against typed defaults.

  Config files take a small typed argument (`--config=configs/x.py:variant=Ti/16,runlocal`):
  each key must be one of `defaults`; its value is converted to the default's type (a bare
  key sets a bool to True).

  Raises:
    ValueError: for unknown keys, naming the valid ones.
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise errors.UserError(
          f"Unknown config argument {key!r}. Valid arguments: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in _BOOLS:
        raise errors.UserError(f"Config argument {key}={value!r} is not a boolean: use {key}, "
                               f"{key}=true or {key}=false.")
      result[key] = _BOOLS[value.lower()]
    elif default is None:
      result[key] = value
    else:
      try:
        result[key] = type(default)(value)
      except ValueError:
        raise errors.UserError(f"Config argument {key}={value!r} is not a valid "
                               f"{type(default).__name__}.") from None
  return result


# DIV's lambda under the authors' recipe: 100, their MNIST-CIFAR value tuned with their code's
# loss (ArmandNM/diverse-vit README, "Experiments"). The paper's raw-gradient term has no
# model-independent lambda: each config sets its own (configs/mnist_cifar.py says how).
DIV_CODE_WEIGHT = 100.0


def set_runlocal(config, *, steps: int = 10, warmup_steps: int = 1,
                 eval_every: int | None = None, checkpoint_every: int = 5) -> None:
  """The schedule of a config's `runlocal` smoke run (big_vision's `runlocal`): batch 8, eval
  batch 32, `steps` steps (no epochs), cosine with `warmup_steps`, a log line every 5 steps,
  an evaluation every `eval_every` steps (default: at the end) and a checkpoint every
  `checkpoint_every`."""
  config.batch_size, config.eval_batch_size = 8, 32
  config.total_epochs, config.total_steps = None, steps
  config.schedule = dict(name="cosine", warmup_steps=warmup_steps)
  config.log_every_steps = 5
  config.eval_every_steps = eval_every or steps
  config.checkpoint_every_steps = checkpoint_every


def set_div_regularizer(config, *, impl: str, weight: float, layers=(-1,)) -> None:
  """Adds the head-diversity (DIV) regularizer to `config`, as the paper or its code has it.

  `impl='paper'`: the poster's L_IG (sum over head pairs, raw input gradients). `impl='code'`:
  the authors' loss (ArmandNM/diverse-vit, diverse_vit/losses.py, `input_gradient_loss` with
  `normalize_grads='per_token'`): per-token normalized gradients (cosine) and the mean over
  batch x H x H. `weight` is lambda. The model is left alone: the authors' architecture (no
  residual around the last block's attention, `Transformer.forward` in their
  diverse_vit/models/vision_transformer.py) is every poster row's, ERM included, so the
  configs set it on `config.model` themselves (`AUTHORS_ARCHITECTURE`).
  """
  if impl not in ("paper", "code"):
    raise errors.UserError(f"DIV impl must be 'paper' or 'code', got {impl!r}.")
  div = dict(name="div", weight=weight, layers=tuple(layers))
  if impl == "code":
    div.update(normalize=True, reduction="mean")
  config.regularizers = [div]


# The authors' ViT drops the residual around the last block's attention in every run, ERM
# included (ArmandNM/diverse-vit, diverse_vit/models/vision_transformer.py,
# `Transformer.forward`: `x = attn(x)` in the last layer, `x = attn(x) + x` elsewhere). Masking
# heads there then changes the whole residual stream, not one branch of it. The poster configs
# and the quickstart merge this into `config.model`; their `residual` argument restores it.
AUTHORS_ARCHITECTURE = dict(last_attn_residual=False)


def overridable(config) -> ml_collections.ConfigDict:
  """`config` with every documented field present and typed, for command-line overrides.

  Like `with_defaults` (the same values), but fields whose default is None become typed
  placeholders (`--config.total_epochs=3` parses a float), and `optimizer`, `schedule` and
  `init_from` list all their fields (None = the consumer's default). Not validated: the
  trainer calls `with_defaults` on the result.
  """
  merged = _merge(config)
  model_types = {k: t for k, (_, t) in _model_defaults(merged["model_name"]).items()}
  merged["model"] = {k: _typed(v, model_types.get(k, object))
                     for k, v in merged["model"].items()}
  merged["data"] = {k: _typed(v, object) for k, v in merged["data"].items()}
  for section in _OPEN_SECTIONS:
    fields = dict(_open_section_fields(section))
    given = merged[section] if isinstance(merged[section], dict) else {}
    merged[section] = {k: _typed(given.get(k), fields.get(k, object))
                       for k in sorted(set(fields) | set(given))}
  for key, kind in _NONE_TYPES.items():
    merged[key] = _typed(merged[key], kind)
  for key in ("total_steps", "total_epochs"):  # Either may be switched off: `=None`.
    merged[key] = config_dict.FieldReference(merged[key], field_type=object)
  return ml_collections.ConfigDict(merged)


def _typed(value, kind):
  return config_dict.placeholder(kind) if value is None else value


def import_config(path: str):
  """The module of a config file, imported by path as ml_collections' config_flags does."""
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path_and_arg: str) -> ml_collections.ConfigDict:
  """Loads `configs/x.py[:arg]` as the command line does, ready for overrides.

  The common arguments (`COMMON_ARGS`, e.g. `dtype=bfloat16`) are taken out of `arg` and
  applied here, so every config file accepts them; the rest goes to `get_config(arg)`.

  Raises:
    ValueError: a clean message for an unknown or badly typed argument, or a missing file.
  """
  path, _, arg = path_and_arg.partition(":")
  if not os.path.isfile(path):
    raise errors.PathNotFoundError(f"Config file {path!r} not found.")
  items = [i for i in arg.split(",") if i]
  common = [i for i in items if i.partition("=")[0].strip() in COMMON_ARGS]
  rest = ",".join(i for i in items if i not in common) or None
  common = parse_arg(",".join(common), **COMMON_ARGS)
  module = import_config(path)
  config = module.get_config(rest) if rest is not None else module.get_config()
  if common.dtype:
    if common.dtype not in DTYPES:
      raise errors.UserError(f"Config argument dtype={common.dtype!r}: valid dtypes {DTYPES}.")
    config.model["dtype"] = common.dtype
  return overridable(config)


def unknown_override_message(config, field_path: str) -> str:
  """A message naming the first missing part of `field_path` and the valid fields there."""
  node, where = config, "config"
  for part in field_path.split("."):
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node, where = node[part], f"{where}.{part}"
      continue
    valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    return (f"Unknown config field {where}.{part} (in --config.{field_path}). "
            + (f"Valid fields of {where}: {valid}." if valid else f"{where} has no fields."))
  return f"Cannot override --config.{field_path}."


class ConfigFileParser(flags.ArgumentParser):
  """absl parser for `--config=path.py[:arg]`: `load_config_file`, then locked."""

  def parse(self, argument):
    config = load_config_file(argument)
    config.lock()
    return config

  def flag_type(self):
    return "config object"


def explain_override_error(argv, error) -> str:
  """The message for a failed `--config.a.b=v` override: the unknown field and valid ones."""
  path_arg = None
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      path_arg = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      path_arg = argv[i + 1]
  try:
    config = load_config_file(path_arg)
  except Exception:  # pylint: disable=broad-except
    return f"{type(error).__name__}: {error}"
  for a in argv:
    if a.startswith("--config."):
      field_path = a[len("--config."):].split("=", 1)[0]
      node = config
      for part in field_path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
          return unknown_override_message(config, field_path)
        node = node[part]
  return f"{type(error).__name__}: {error}"


def parse_flags(argv):
  """absl's flag parsing for `--config` commands: a bad `--config.*` is one line, no traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (KeyError, AttributeError) as e:  # config_flags: an override of a missing field.
    message = explain_override_error(argv, e)
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
  sys.exit(1)
