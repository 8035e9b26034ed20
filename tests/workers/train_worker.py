"""Worker: runs `train_and_evaluate` on the quickstart config with JSON overrides.

  python train_worker.py WORKDIR '{"total_steps": 12, ...}' [kill:N | term:N | killsave:N]
      [--process_id=I --num_processes=P --coordinator=host:port] [--step_seconds=S]

`kill:N` SIGKILLs this process right after the checkpoint of step N is on disk (a crash);
`term:N` sends it SIGTERM at that point (a preemption); `killsave:N` SIGKILLs it while the
asynchronous save of step N is in flight (its files written, not yet committed).
`--step_seconds` paces each step like a real model's (the preemption sync protocol runs in
the background while steps go on). Prints the final metrics as JSON.
"""

import importlib.util
import json
import os
import signal
import sys

HERE = os.path.dirname(__file__)
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def load_config(overrides):
  spec = importlib.util.spec_from_file_location("qs", os.path.join(ROOT, "configs",
                                                                   "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.unlock()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def main():
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  action = next((a for a in sys.argv[3:] if ":" in a and not a.startswith("--")), None)
  opts = dict(a[2:].split("=", 1) for a in sys.argv[3:] if a.startswith("--"))
  from absl import logging  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import train  # pylint: disable=g-import-not-at-top
  from vitreg_jax import sharding  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)  # As under absl.app.run (main.py).
  if "coordinator" in opts:
    sharding.maybe_initialize_distributed(opts["coordinator"], int(opts["num_processes"]),
                                          int(opts["process_id"]))
  if "step_seconds" in opts:
    _pace_steps(float(opts["step_seconds"]))
  if action and action.startswith("killsave:"):
    _kill_during_save(int(action.split(":")[1]))
  elif action:
    kind, at = action.split(":")
    original = checkpoint.Checkpointer.save

    def save(self, step, state, meta, *, force=False):
      saved = original(self, step, state, meta, force=force)
      if saved and step == int(at):
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGTERM)
      return saved
    checkpoint.Checkpointer.save = save
  results = train.train_and_evaluate(load_config(overrides), workdir)
  print("RESULTS " + json.dumps(results))


def _pace_steps(seconds):
  import time  # pylint: disable=g-import-not-at-top
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  make = data.Dataset.train_iterator

  def paced(self, **kwargs):
    for batch in make(self, **kwargs):
      time.sleep(seconds)
      yield batch
  data.Dataset.train_iterator = paced


def _kill_during_save(at):
  # orbax writes a step into a temporary folder and renames it when complete (finalize):
  # dying just before the rename is a kill with the save in flight and every file written.
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if self.get_final().name == str(at):
      os.kill(os.getpid(), signal.SIGKILL)
    return await original(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize


if __name__ == "__main__":
  main()
