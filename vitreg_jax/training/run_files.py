"""Where a run keeps its files in its workdir: the saved config and the checkpoint step folders.

Only `etils.epath`, no jax: `sweep` and the reports read workdirs through these names without
paying for jax; `rundir` (which rebuilds the run, with jax) reads them from here.
"""

from etils import epath

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def config_path(workdir: str) -> str:
  return str(epath.Path(workdir) / CONFIG_FILE)


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints saved under `workdir/checkpoints` (sorted, may be empty)."""
  return step_dirs(epath.Path(workdir) / CHECKPOINT_DIR)


def step_dirs(directory) -> list[int]:
  """Steps of the orbax step folders (`<step>/`) in `directory` (sorted, may be empty)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())
