"""The train step compiles exactly once in a run, across evaluation and checkpointing.

A second compilation would mean something in the loop changes the step's input shapes,
dtypes, shardings or static arguments between steps (e.g. a state restored or saved with
another layout), which costs a full XLA compile each time on a big model. The test reads
JAX's own compile log (`jax.log_compiles`) during a tiny quickstart run that evaluates and
checkpoints in the middle.
"""

import logging
import os
import re
import sys

import jax

from vitreg_jax.training import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))
import train_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = {
    "model.width": 16, "model.depth": 1, "model.mlp_dim": 32, "model.num_heads": 2,
    "data.num_train": 64, "data.num_val": 24, "data.num_test": 24,
    "batch_size": 8, "eval_batch_size": 16, "total_steps": 7,
    "checkpoint_every_steps": 2, "log_every_steps": 3, "eval_every_steps": 3,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "cosine", "warmup_steps": 2},
}


class _Compiles(logging.Handler):
  """Collects the function names of JAX's 'Compiling <name> ...' log records."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.names = []

  def emit(self, record):
    match = re.match(r"Compiling jit\((\w+)\)", record.getMessage())
    if match:
      self.names.append(match.group(1))


def test_train_step_compiles_once_across_eval_and_checkpoints(tmp_path):
  handler = _Compiles()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      results = train.train_and_evaluate(train_worker.load_config(TINY), str(tmp_path))
  finally:
    logger.removeHandler(handler)
  assert results, "the run produced no final evaluation"
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert len(steps) >= 2, steps  # checkpoints were written during the run
  evals = [line for line in open(tmp_path / "metrics.jsonl") if '"train"' not in line]
  assert len(evals) >= 2, evals  # a mid-run evaluation and the final one
  assert handler.names.count("train_step") == 1, handler.names
  assert handler.names.count("eval_step") == 1, handler.names
