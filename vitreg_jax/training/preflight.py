"""The checks a training run makes before any compute (`python -m vitreg_jax.main` runs them
before it logs the config), so that a mistake stops as one `errors.UserError` line.

The checks are the ones training itself runs, in training's order (the hooks' `prepare` first:
JTT's stage 2 writes the error set that opening the dataset reads), called early.
"""

from absl import logging
from etils import epath

from vitreg_jax import checks
from vitreg_jax import config_lib
from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax import regularizers
from vitreg_jax.training import hooks as hooks_lib
from vitreg_jax.training import optim
from vitreg_jax.training import steps
from vitreg_jax.training import train


def check(config, *, prepare_data: bool = False):
  """The run's checks that need no compute, so that a mistake stops here as one line.

  The config's fields and names (`config_lib.with_defaults`), the dataset (known, prepared:
  `open_dataset`), the model's and the regularizers' fields, the optimizer and schedule, both
  batch sizes against the devices, `config.init_from`'s path and `config.head_eval`'s layers.
  Each is the check training itself runs (it fails the same way when called without this),
  run here before the config is logged and anything is compiled.

  Returns:
    The config with every default filled in.
  """
  config = config_lib.with_defaults(config)
  # The hooks' `prepare` first, as training runs it: JTT's stage 2 writes its error set,
  # which opening the dataset (its upsampling sampler) reads.
  hooks_lib.Hooks(train.default_hooks()).prepare(config)
  dataset = open_dataset(config.data, prepare_data=prepare_data)
  model = steps.create_model(config, dataset.info.num_classes)
  regularizers.build(config.regularizers, model)  # each term's layers against the model
  total_steps, steps_per_epoch = train.num_train_steps(config, dataset)
  optim.make_optimizer(config, total_steps, steps_per_epoch)
  train.make_mesh(config)
  if config.init_from and not epath.Path(config.init_from["path"]).exists():
    raise errors.PathNotFoundError(
        f"config.init_from.path {config.init_from['path']!r} does not exist.")
  if config.head_eval not in (None, "", False):
    depth, _ = checks.head_shape(model, needed_by="config.head_eval")
    checks.resolve_layers(config.head_eval, depth, "config.head_eval")
  return config


def open_dataset(data_config, *, prepare_data: bool = False):
  """`data.open`, preparing the dataset first when asked and needed.

  A dataset that is not prepared is a `UserError` (a `data.DatasetNotPreparedError`) whose
  message says how to prepare it and, where TFDS downloads it, that `--prepare_data` does.
  """
  try:
    return data.open(data_config)
  except data.DatasetNotPreparedError as e:
    spec, cfg = data.get_spec(data_config)
    if not prepare_data:
      hint = (" (or add --prepare_data to this command to do it first)"
              if getattr(spec, "downloads", False) else "")
      raise data.DatasetNotPreparedError(f"{e}{hint}") from None
  logging.info("Preparing dataset %r in %s (--prepare_data).", cfg["name"], cfg["data_dir"])
  spec.prepare(cfg)
  return data.open(data_config)
