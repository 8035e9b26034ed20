"""Experiment config defaults and validation.

A config file's `get_config(arg)` returns an `ml_collections.ConfigDict` with any subset of the
top-level fields below; `with_defaults` fills in the rest and rejects unknown fields, naming the
valid ones, before any compute is spent. Nested sections (`model`, `data`, `optimizer`,
`schedule`, `regularizers`) are validated by the module that consumes them.
"""

import ml_collections

DEFAULTS = dict(
    seed=0,
    model_name="vit",
    model={},                 # the model's own fields: models.create(model_name, **model)
    data={"name": "dominoes"},  # data.get_info / make_*_iterator
    batch_size=128,           # global batch over all devices and processes
    eval_batch_size=None,     # default: batch_size
    total_steps=None,         # one of total_steps / total_epochs
    total_epochs=None,
    optimizer={"name": "adam", "lr": 1e-3},
    schedule={"name": "cosine", "warmup_steps": 0},
    label_smoothing=0.0,
    regularizers=[],          # list of dict(name=..., weight=..., layers=..., **options)
    head_mask=None,           # optional [depth, heads] mask applied while training
    init_from=None,           # dict(path, kind, step, reset_head); kind: 'checkpoint' | 'npz'
                              # | 'big_vision' | 'timm' (docs/finetuning.md)
    log_every_steps=50,
    eval_every_steps=500,
    checkpoint_every_steps=500,
    keep_checkpoints=3,
    sharding={"fsdp": False, "fsdp_min_size": 2**14},
    profile=False,            # trace a few steps into the TensorBoard profile plugin
    runlocal=False,           # set by configs for laptop-size runs (informational)
)


def with_defaults(config) -> ml_collections.ConfigDict:
  """Returns a new ConfigDict: DEFAULTS overridden by `config`, after validating its keys.

  Raises:
    ValueError: naming unknown top-level fields and listing the valid ones.
  """
  unknown = sorted(set(config.keys()) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"Unknown config field(s) {unknown}. Valid top-level fields: "
                     f"{sorted(DEFAULTS)}.")
  merged = dict(DEFAULTS)
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    merged[key] = value
  if (merged["total_steps"] is None) == (merged["total_epochs"] is None):
    raise ValueError("Set exactly one of config.total_steps and config.total_epochs "
                     f"(got total_steps={merged['total_steps']}, "
                     f"total_epochs={merged['total_epochs']}).")
  return ml_collections.ConfigDict(merged)


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
      raise ValueError(f"Unknown config argument {key!r}. Valid arguments: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      result[key] = value.lower() in ("", "1", "true", "yes")
    elif default is None:
      result[key] = value
    else:
      result[key] = type(default)(value)
  return result


# Default DIV weight per variant. 'code': lambda = 100, the authors' MNIST-CIFAR value tuned
# with their code's loss (ArmandNM/diverse-vit README, "Experiments"). 'paper': the poster's
# L_IG has another scale (raw gradients, sum over head pairs); 0.1 matches the parameter-gradient
# norm of the authors' term at lambda 100 on their MNIST-CIFAR model at initialization
# (`python bench/div_scale.py`, median of 5 seeds; docs/configs.md). Not tuned on validation.
DIV_WEIGHTS = {"code": 100.0, "paper": 0.1}


def set_div_regularizer(config, *, impl: str = "paper", weight: float | None = None,
                        layers=(-1,)) -> None:
  """Adds the head-diversity (DIV) regularizer to `config`, as the paper or its code has it.

  `impl='paper'`: the poster's L_IG (sum over head pairs, raw input gradients). `impl='code'`:
  the authors' code (ArmandNM/diverse-vit, diverse_vit/losses.py and models/
  vision_transformer.py): per-token normalized gradients (cosine), the mean over
  batch x H x H, and no residual around the last block's attention (a model field, so it is set
  on `config.model`). `weight=None` takes `DIV_WEIGHTS[impl]`.
  """
  if impl not in ("paper", "code"):
    raise ValueError(f"DIV impl must be 'paper' or 'code', got {impl!r}.")
  weight = DIV_WEIGHTS[impl] if weight is None else weight
  div = dict(name="div", weight=weight, layers=tuple(layers))
  if impl == "code":
    div.update(normalize=True, reduction="mean")
    config.model["last_attn_residual"] = False
  config.regularizers = [div]
