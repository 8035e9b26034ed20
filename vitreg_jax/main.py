"""Command-line entry point.

  python -m vitreg_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart \
      [--config.optimizer.lr=3e-4 ...]

A mistake (an unknown field or name, a bad value, a dataset that is not prepared) stops
before any compute with one line on stderr and exit status 1 (`errors.UserError`); the config
is logged only once it is valid. `--prepare_data` prepares a missing dataset first
(`python -m vitreg_jax.data.prepare`'s work: TFDS downloads what it can).

Every documented config field can be overridden (`--config.model.dtype=bfloat16`,
`--config.sharding.fsdp=True`): `config_lib.load_config_file` fills in all of them before the
overrides are applied; an unknown field or a badly typed value stops here with a message
naming the valid fields. Rerunning the same command resumes from the newest checkpoint in
--workdir; a changed model, data stream or optimizer is refused unless
--accept_config_change is given (`rundir.check_resume_config`). Multi-process
runs (several hosts, or several processes on one machine) pass --coordinator_address,
--num_processes and --process_id, or set the JAX_* / SLURM variables jax reads itself.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath
from ml_collections import config_flags

from vitreg_jax import checks
from vitreg_jax import config_lib
from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax import regularizers
from vitreg_jax import sharding
from vitreg_jax.training import optim
from vitreg_jax.training import steps
from vitreg_jax.training import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arg'.", lock_config=True)
# Every documented field is filled in before the `--config.x=...` overrides are applied.
flags.FLAGS[_CONFIG.name].parser = config_lib.ConfigFileParser()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_ACCEPT_CHANGE = flags.DEFINE_bool(
    "accept_config_change", False,
    "Resume even though the config changes the model, data stream or optimizer.")
_PREPARE_DATA = flags.DEFINE_bool(
    "prepare_data", False,
    "Prepare the dataset first if it is not (as `python -m vitreg_jax.data.prepare NAME`: "
    "TFDS downloads what it can; manual files must already be in data.manual_dir).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's flag parsing, with unknown `--config.*` fields reported cleanly (no traceback)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (KeyError, AttributeError) as e:  # config_flags: an override of a missing field.
    message = config_lib.explain_override_error(argv, e)
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  with errors.exit_on_user_error("FATAL"):
    config = preflight(_CONFIG.value, prepare_data=_PREPARE_DATA.value)
    logging.info("Config:\n%s", config)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             accept_config_change=_ACCEPT_CHANGE.value)


def preflight(config, *, prepare_data: bool = False):
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


class _QuietLibraries(std_logging.Filter):
  """Drops INFO/DEBUG records of chatty libraries (orbax logs every save phase)."""

  def filter(self, record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "jax/_src"))
    return not (noisy and record.levelno < std_logging.WARNING)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
