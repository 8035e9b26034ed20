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

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vitreg_jax import config_lib
from vitreg_jax import errors
from vitreg_jax import sharding
from vitreg_jax.training import preflight
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


parse_flags = config_lib.parse_flags  # Shared with `import_weights`.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  with errors.exit_on_user_error("FATAL"):
    config = preflight.check(_CONFIG.value, prepare_data=_PREPARE_DATA.value)
    logging.info("Config:\n%s", config)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             accept_config_change=_ACCEPT_CHANGE.value)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO/DEBUG records of chatty libraries (orbax logs every save phase)."""

  def filter(self, record):
    noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "jax/_src"))
    return not (noisy and record.levelno < std_logging.WARNING)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
