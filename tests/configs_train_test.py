"""Configs stay alive: two real training steps of every config at its runlocal size.

Each case builds its model, regularizers, optimizer (SAM included), head mask and jitted
train step exactly as `train.train_and_evaluate` does, feeds two generated batches of the
config's image shape (with the Mixup/CutMix recipe when the config mixes) through the loop's
own device transfer (`train.device_batches`), and checks that both steps are finite and move
the parameters. A renamed or removed field, a model that no longer builds at that shape or a
regularizer that no longer traces fails here. No dataset is read (shapes and class counts:
testutil.DATASET_FACTS).

Budget: one case per config file runs in the default suite (~2.5 min on the loaded 2-core
machine, 10-30 s a case); the other variants (every model, penalty, DIV flavour and optimizer the configs offer) are `slow`:
`python -m pytest -q -n 0 -m slow tests/configs_train_test.py` (~10 CPU-minutes).
"""

import glob
import itertools
import os

import jax
import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax.data import groups as groups_lib
from vitreg_jax.data import mixing
from vitreg_jax.heads import masks as head_masks
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import optim
from vitreg_jax.training import steps
from vitreg_jax.training import train

from testutil import (  # pylint: disable=g-bad-import-order
    CONFIGS_DIR, get_config, image_shape, load_config_module, num_classes, steps_per_epoch)

# Every config file at its runlocal size, and every argument that builds a different model,
# regularizer, optimizer or data layout; `test_two_step_cases_cover_every_choice` keeps this
# list complete. (Arguments that only change sizes, epochs or eval splits are covered by the
# shape checks above.)
# One case per config file, in the default suite: the cheapest case that still exercises the
# file's distinctive path (the authors' MNIST-CIFAR ViT with DIV's double backprop, ARViT's
# penalty, Mixup + label smoothing, SAM, AlterNet with BatchNorm).
FAST_CASES = [
    ("quickstart", "runlocal"), ("mnist_cifar", "reg=div,div=code,runlocal"),
    ("waterbirds", "reg=erm,runlocal"),
    ("arvit", "variant=R1-2,dataset=imagenet_rotation,runlocal"), ("arvit_r1", "runlocal"),
    ("how_vits_work", "model=vit,runlocal"), ("optimizer_study", "model=vit,opt=sam,runlocal"),
    ("msa_buildup", "msa=0011,runlocal"), ("baselines", "method=group_dro,runlocal")]
# Every other argument that builds a different model, regularizer or optimizer;
# `test_two_step_cases_cover_every_choice` keeps the two lists complete. (Arguments that only
# change sizes, epochs or eval splits are covered by the shape checks of configs_test.py.)
SLOW_CASES = (
    [("quickstart", "reg=div,runlocal"), ("quickstart", "model=resnet,runlocal"),
     ("quickstart", "model=alternet,smoothing,runlocal")]
    + [("mnist_cifar", a + ",runlocal") for a in ("reg=erm", "reg=div,div=paper")]
    + [("waterbirds", a + ",runlocal") for a in ("reg=div,div=paper,weight=1e9", "reg=div,div=code")]
    + [("arvit", a + ",runlocal") for a in (
        "variant=base", "variant=L6", "variant=vit_tiny",
        "variant=L3,impl=code,dataset=imagenet_rotation",
        "variant=R1-5,impl=code,dataset=imagenet_rotation",
        "variant=base,dataset=embedded_rotation", "variant=vit_tiny,dataset=embedded")]
    + [("how_vits_work", a + ",runlocal") for a in (
        "model=vit,classifier=gap", "model=vit,local_window=3", "model=resnet",
        "model=alternet", "model=resnet,robustness,dataset=cifar10",
        "model=resnet,smoothing", "model=preresnet,smoothing")]
    + [("optimizer_study", a + ",runlocal") for a in (
        "model=vit,opt=sgd", "model=resnet,opt=sam", "model=vit,opt=adamw",
        "model=resnet,opt=adam", "model=vit,opt=sam,data=cifar100")]
    + [("msa_buildup", "msa=0000,runlocal")]
    + [("baselines", a + ",runlocal") for a in ("method=erm", "method=div",
                                                "method=jtt,stage=identify")])
TRAIN_CASES = sorted(FAST_CASES + SLOW_CASES)


def generated_batches(config, shape, classes, num_groups=0):
  """Host batches as the data pipeline yields them: random images of the config's shape,
  labels, `group` when the loss needs it (GroupDRO), and with `data.mixup` each step's
  Mixup/CutMix recipe on every example."""
  rng = np.random.default_rng(0)
  b = config.batch_size
  for step in itertools.count():
    batch = {"image": rng.normal(size=(b, *shape)).astype(np.float32),
             "label": rng.integers(0, classes, b).astype(np.int32)}
    if num_groups:
      batch["group"] = rng.integers(0, num_groups, b).astype(np.int32)
    if config.data.get("mixup"):
      recipe = mixing.draw(config.data.mixup, config.seed, step, *shape[:2])
      batch.update({k: np.broadcast_to(v, (b, *np.shape(v))).copy() for k, v in recipe.items()})
    yield batch


def train_two_steps(config):
  """Two steps of the training loop's own pieces on generated data: the state, optimizer,
  regularizers, head mask and jitted step as `train.train_and_evaluate` builds them."""
  shape, classes = tuple(image_shape(config)), num_classes(config)
  model = steps.create_model(config, classes)
  total_steps = config.total_steps or config.total_epochs * steps_per_epoch(config)
  tx, _ = optim.make_optimizer(config, total_steps, steps_per_epoch(config))
  mesh = train.make_mesh(config)
  # GroupDRO's group counts come from the (embedded) training split, as in training.
  dataset = data.open(config.data) if config.loss.name == "group_dro" else None
  objective = objective_lib.Objective.from_config(config, model, dataset, num_classes=classes)
  state, shardings = steps.create_train_state(config, model, tx, shape, mesh,
                                              loss_state=objective.init_state)
  train_fn = steps.jit_train_step(shardings, mesh, objective=objective, tx=tx,
                                  head_mask=head_masks.train_head_mask(config, model))
  before = jax.device_get(state.params)
  groups = groups_lib.num_groups(dataset.info) if "group" in objective.batch_keys else 0
  batches = train.device_batches(generated_batches(config, shape, classes, groups), mesh,
                                 extra_keys=objective.batch_keys)
  measured = []
  for _ in range(2):
    state, m = train_fn(state, next(batches))
    measured.append(jax.device_get(m))
  return before, jax.device_get(state), measured


@pytest.mark.parametrize("name,arg", FAST_CASES + [
    pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES])
def test_config_trains_two_steps_at_runlocal_size(name, arg):
  config = get_config(name, arg)
  assert config.total_steps <= 30 and config.batch_size <= 64   # the runlocal size
  before, state, measured = train_two_steps(config)
  assert int(state.step) == 2
  for m in measured:
    assert m["finite"] and np.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert {f"reg/{r['name']}" for r in config.regularizers} <= set(m)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), state.params, before)
  assert max(jax.tree.leaves(moved)) > 0   # the optimizer really stepped


def test_two_step_cases_cover_every_choice():
  covered = {name for name, _ in TRAIN_CASES}
  files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS_DIR, "*.py"))}
  assert covered == files, "add new config files to TRAIN_CASES"
  assert {name for name, _ in FAST_CASES} == files   # each file in the default suite
  args = {name: [dict(kv.partition("=")[::2] for kv in a.split(",")) for _, a in cases]
          for name, cases in itertools.groupby(TRAIN_CASES, key=lambda c: c[0])}
  choices = lambda name, key: {a.get(key) for a in args[name]}
  for name in ("mnist_cifar", "waterbirds"):
    assert set(load_config_module(name).DIV_VARIANTS) <= choices(name, "div")
  assert set(load_config_module("how_vits_work").MODELS) <= choices("how_vits_work", "model")
  assert (set(load_config_module("how_vits_work").CLASSIFIERS) - {"token"}
          <= choices("how_vits_work", "classifier"))
  study = load_config_module("optimizer_study")
  assert set(study.OPTIMIZERS) <= choices("optimizer_study", "opt")
  assert set(study.MODELS) <= choices("optimizer_study", "model")
  assert set(study.DATASETS) - {"dominoes"} <= choices("optimizer_study", "data")
  arvit = choices("arvit", "variant")   # every kind of row: base, L (distance), R1, ViT-Tiny
  assert {"base", "vit_tiny"} <= arvit and any(v[0] == "L" for v in arvit if v)
  assert any(v.startswith("R1") for v in arvit if v)
  assert set(load_config_module("arvit").IMPLS) - {"paper"} <= choices("arvit", "impl")


def test_two_steps_fail_when_a_config_rots():
  config = get_config("quickstart", "runlocal")
  model = config.model.to_dict()
  model["hidden_mlp"] = model.pop("mlp_dim")   # a field renamed in the config, not the model
  config.model = model
  with pytest.raises(ValueError, match="hidden_mlp"):
    train_two_steps(config)


def test_mixup_recipe_reaches_the_train_step():
  # how_vits_work trains with Mixup/CutMix: the recipe the pipeline puts on each batch must
  # cross to the device with the images, or the step silently trains without mixing.
  config = get_config("how_vits_work", "model=vit,runlocal")
  assert config.data.mixup
  mesh = train.make_mesh(config)
  batch = next(train.device_batches(generated_batches(config, (32, 32, 3), 100), mesh))
  assert set(mixing.BATCH_KEYS) <= set(batch)
  no_mix = next(train.device_batches(
      generated_batches(get_config("quickstart"), (32, 16, 3), 2), mesh))
  assert set(no_mix) == {"image", "label"}
