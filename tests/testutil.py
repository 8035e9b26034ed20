"""Helpers shared by the model tests (not a test module)."""

import functools

import jax
import numpy as np


def np_init(model, x, seed=0, **kwargs):
  """Variables with the shapes of `model.init`, filled by NumPy (no JAX random compilation).

  Kernels get std 1/sqrt(fan_in), LayerNorm/BatchNorm scales 1 + noise, BatchNorm variances 1;
  the tests only need generic, non-degenerate weights.
  """
  shapes = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), x)
  rng = np.random.RandomState(seed)

  def fill(path, s):
    name = getattr(path[-1], 'key', '')
    if name == 'var':
      return np.ones(s.shape, np.float32)
    if name == 'mean':
      return np.zeros(s.shape, np.float32)
    std = 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) >= 2 else 0.1
    value = rng.normal(0.0, std, s.shape) + (name == 'scale')
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def make_run_dir(workdir, model_name: str, model: dict, data: dict, steps=(1,),
                 num_classes: int = 2, image_shape=(32, 16, 3), **config):
  """A run directory as training leaves it: `config.json` and a checkpoint per step (the
  initial weights plus 0.01 * step, so the head is non-zero and the steps differ)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vitreg_jax import config_lib  # pylint: disable=g-import-not-at-top
  from vitreg_jax import models  # pylint: disable=g-import-not-at-top
  from vitreg_jax.training import rundir  # pylint: disable=g-import-not-at-top
  config = config_lib.with_defaults(ml_collections.ConfigDict(dict(
      model_name=model_name, model=model, data=data, batch_size=8, eval_batch_size=16,
      total_steps=max(steps), **config)))
  rundir.save_config(config, str(workdir))
  net = models.create(model_name, num_classes, **model)
  variables = dict(net.init(jax.random.key(0), np.zeros((1, *image_shape), np.float32)))
  params = variables.pop('params')
  for step in steps:
    tree = {'step': np.int32(step), 'params': jax.tree.map(lambda p: p + 0.01 * step, params),
            'opt_state': {}, 'model_state': variables, 'rng': np.zeros(2, np.uint32)}
    ocp.PyTreeCheckpointer().save(str(workdir / 'checkpoints' / str(step) / 'state'), tree)
  return str(workdir)
