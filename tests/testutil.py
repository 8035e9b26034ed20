"""Helpers and settings shared by several test files (not a test module).

A test file imports what it shares with another from here, never from the other test file.
"""

import functools
import importlib
import importlib.util
import os
import types

from absl import flags
import jax
import numpy as np

from vitreg_jax import config_lib
from vitreg_jax import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(ROOT, "configs")

# The quickstart ViT at a size that trains 12 steps in seconds (`train_worker.load_config`
# overrides): small enough for several runs per test, with checkpoints, logs and evaluations.
TINY_TRAIN = {
    "model.width": 16, "model.depth": 1, "model.mlp_dim": 32, "model.num_heads": 2,
    "data.num_train": 128, "data.num_val": 32, "data.num_test": 32,
    "batch_size": 16, "eval_batch_size": 32, "total_steps": 12,
    "checkpoint_every_steps": 4, "log_every_steps": 2, "eval_every_steps": 4,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"name": "cosine", "warmup_steps": 2},
}


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


# ------------------------------------------------------------------- analysis commands

# The runs the analysis tests read: tiny dominoes splits and two ViTs of different widths
# (a ResNet's Hessian-vector product alone compiles for a minute on a shared CPU).
ANALYSIS_DATA = dict(name="dominoes", num_train=64, num_val=32, num_test=32,
                     eval_splits=("val_id",))
ANALYSIS_VITS = {
    "vit_a": dict(width=8, depth=1, num_heads=2, mlp_dim=16, patch_size=8),
    "vit_b": dict(width=16, depth=1, num_heads=2, mlp_dim=16, patch_size=8),
}


# Tiny settings of each analysis command (`run_analysis_main`): the plumbing, not the figures.
TINY_ANALYSIS_ARGS = {
    "hessian": ["--num_batches=1", "--top_k=2", "--max_iter=3", "--batch_size=8"],
    "fourier": ["--num_examples=16", "--batch_size=8"],
    "noise": ["--noise_examples=16", "--num_freqs=2", "--batch_size=8", "--corruption=none"],
    "landscape": ["--grid_points=3", "--line_points=3", "--landscape_batches=1",
                  "--batch_size=8", "--points_per_call=5"],
    "variance": ["--num_examples=16", "--batch_size=8"],
    "calibration": ["--bins=5", "--batch_size=8"],
}


def make_analysis_run(workdir, name: str) -> str:
  """A run directory with a saved config and a step-1 checkpoint of the ViT `ANALYSIS_VITS[name]`
  on `ANALYSIS_DATA`."""
  return make_run_dir(workdir, "vit", ANALYSIS_VITS[name], ANALYSIS_DATA)


def run_analysis_main(analysis: str, *args):
  """The analysis command's `main` in this process, its flags parsed from `args` as on the
  command line (every other flag back at its default): no interpreter and JAX start-up per
  command. The command-line wrapper itself (usage errors on stderr) is tested through
  subprocesses."""
  module = importlib.import_module(f"vitreg_jax.analysis.{analysis}")
  module.define_flags()  # as its `__main__` does: no flag is defined at import
  flags.FLAGS.unparse_flags()
  argv = flags.FLAGS([analysis, *args])
  try:
    return module.main(argv)
  finally:
    flags.FLAGS.unparse_flags()


# ------------------------------------------------------------------- the experiment configs

# name -> (num_classes, train examples, default image shape or None = image_size square): the
# datasets' published figures, so that the config tests read no dataset.
DATASET_FACTS = {
    "dominoes": (2, 10000, (32, 16, 3)),
    "mnist_cifar": (2, 10000, (64, 32, 3)),
    "waterbirds": (2, 4795, None),
    "imagenet_rotation": (4, 1281167, None),
    "cifar10": (10, 50000, None),
    "cifar100": (100, 50000, None),
    "cifar10_corrupted": (10, 50000, None),
    "cifar100_corrupted": (100, 50000, None),
    "oxford_flowers102": (102, 1020, None),
    "imagenette": (10, 9469, None),
    "imagewoof": (10, 9025, None),
    "embedded": (10, 2000, (32, 32, 3)),
    "embedded_rotation": (4, 20000, (32, 32, 3)),
}


def load_config_module(name: str):
  """Imports configs/<name>.py by path, as ml_collections' config_flags does."""
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(CONFIGS_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, arg=None):
  """configs/<name>.py's `get_config(arg)`, filled with `config_lib.with_defaults`."""
  return config_lib.with_defaults(load_config_module(name).get_config(arg))


def image_shape(config) -> tuple[int, int, int]:
  """The config's image shape from `DATASET_FACTS` (its data section validated by
  `data.get_spec`: names and options, no file opened)."""
  _, cfg = data_lib.get_spec(config.data)
  shape = DATASET_FACTS[cfg["name"]][2]
  if shape is None:
    size = cfg["image_size"]
    shape = (size, size, 3)
  return shape


def num_classes(config) -> int:
  """The config's dataset's number of classes, from `DATASET_FACTS`."""
  return DATASET_FACTS[config.data.name][0]


def steps_per_epoch(config) -> int:
  """Steps of one epoch over the config's full training set (`DATASET_FACTS`)."""
  return int(np.ceil(DATASET_FACTS[config.data.name][1] / config.batch_size))


# ------------------------------------------------------------------- stand-in datasets

FAKE_N_TRAIN = 20  # `fake_embedded_load`'s train split size
FAKE_N_EVAL = 10  # and every other split's


def fake_embedded_load(split, seed=0, size=None):
  """Stand-in `dominoes.load`: each example's image encodes its unique `uid` (so a test sees
  exactly which examples a batch holds); spurious = label on train, random elsewhere."""
  n = size or (FAKE_N_TRAIN if split == "train" else FAKE_N_EVAL)
  rng = np.random.default_rng([seed, len(split)])
  uid = np.arange(n, dtype=np.int32) + (0 if split == "train" else 1000)
  label = (np.arange(n) % 2).astype(np.int32)
  spurious = label if split == "train" else rng.integers(0, 2, n).astype(np.int32)
  image = np.zeros((n, 8, 4, 3), np.uint8) + (uid % 256).astype(np.uint8)[:, None, None, None]
  return {"image": image, "label": label, "spurious": spurious, "uid": uid}


def fake_embedded_module(name: str) -> types.ModuleType:
  """A module named `name` with the embedded-dataset contract of vitreg_jax/data/dominoes.py
  (SPLITS, NUM_CLASSES, IMAGE_SHAPE, load) over `fake_embedded_load`; put it in `sys.modules`
  and wrap it in `custom.EmbeddedDataset(name)`."""
  mod = types.ModuleType(name)
  mod.SPLITS = ("train", "val_id", "val_ood", "test_id", "test_ood")
  mod.NUM_CLASSES = 2
  mod.IMAGE_SHAPE = (8, 4, 3)
  mod.load = fake_embedded_load
  return mod


def write_cifar100_corrupted(folder, n_per_severity=3, corruptions=("fog", "snow")):
  """A tiny CIFAR-100-C folder (`labels.npy` and `<corruption>.npy`): `5 * n_per_severity`
  32x32 images per corruption, severity s's block of constant value 40 * s, labels 0, 1, ..."""
  os.makedirs(folder, exist_ok=True)
  labels = np.arange(5 * n_per_severity) % 100
  np.save(folder / "labels.npy", labels.astype(np.uint8))
  for c in corruptions:
    images = np.repeat(np.arange(1, 6, dtype=np.uint8) * 40, n_per_severity)
    np.save(folder / f"{c}.npy", np.broadcast_to(
        images[:, None, None, None], (5 * n_per_severity, 32, 32, 3)).copy())
