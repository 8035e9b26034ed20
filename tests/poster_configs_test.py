"""The head-diversity poster's configs train the authors' model in every row.

The authors' ViT has no residual around the last block's attention, in ERM and DIV runs
alike (ArmandNM/diverse-vit, diverse_vit/models/vision_transformer.py, `Transformer.forward`).
So every row of configs/mnist_cifar.py, configs/waterbirds.py and configs/quickstart.py
(ERM, DIV code and paper, their sweeps and runlocal) must build that model, ERM and DIV the
same one, and log every head alone at each evaluation (`head_eval`), for the tables' authors'
statistics.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import models

import testutil  # pylint: disable=g-bad-import-order

# Every poster row: the rows of the tables and the other arguments that change the model.
ROWS = {
    "mnist_cifar": ["reg=erm", "reg=div", "reg=div,div=code", "reg=div,div=paper",
                    "reg=div,div=paper,weight=3", "reg=erm,data=dominoes",
                    "reg=div,data=dominoes", "reg=div,div=paper,data=dominoes",
                    "reg=erm,runlocal", "reg=div,runlocal", "reg=erm,agreement=0.5"],
    "waterbirds": ["reg=erm", "reg=div", "reg=div,div=code", "reg=div,div=paper,weight=1e9",
                   "reg=erm,variant=S/16", "reg=div,variant=S/16",
                   "reg=erm,init=/ckpt/ViT-B_16.npz", "reg=div,init=/ckpt/ViT-B_16.npz",
                   "reg=erm,runlocal", "reg=div,runlocal"],
    "quickstart": [None, "reg=erm", "reg=div", "reg=div,div_weight=10", "runlocal",
                   "reg=div,runlocal", "steps=200"],
}
# (ERM, DIV) argument pairs that must build identical models.
PAIRS = [("mnist_cifar", "reg=erm", "reg=div"), ("mnist_cifar", "reg=erm", "reg=div,div=paper"),
         ("mnist_cifar", "reg=erm,data=dominoes", "reg=div,data=dominoes"),
         ("mnist_cifar", "reg=erm,runlocal", "reg=div,runlocal"),
         ("waterbirds", "reg=erm", "reg=div"), ("waterbirds", "reg=erm,runlocal",
                                                "reg=div,runlocal"),
         ("waterbirds", "reg=erm", "reg=div,div=paper,weight=1e9"),
         ("quickstart", "reg=erm", "reg=div"), ("quickstart", "runlocal", "reg=div,runlocal")]


def _sweep_rows(name):
  module = testutil.load_config_module(name)
  return [",".join(f"{k}={v}" for k, v in point.items() if not k.startswith("config."))
          for point in module.get_sweep()]


def _all_rows():
  rows = [(name, arg) for name, args in ROWS.items() for arg in args]
  rows += [("mnist_cifar", a) for a in _sweep_rows("mnist_cifar")]
  rows += [("quickstart", a) for a in _sweep_rows("quickstart")]
  return rows


@pytest.mark.parametrize("name,arg", _all_rows())
def test_every_poster_row_has_no_last_residual_and_logs_every_head(name, arg):
  config = testutil.get_config(name, arg)
  assert config.model.last_attn_residual is False
  assert config.head_eval == "-1"
  model = models.create(config.model_name, testutil.num_classes(config),
                        **config.model.to_dict())
  assert model.last_attn_residual is False


@pytest.mark.parametrize("name,erm_arg,div_arg", PAIRS)
def test_erm_and_div_build_the_same_model(name, erm_arg, div_arg):
  erm, div = testutil.get_config(name, erm_arg), testutil.get_config(name, div_arg)
  assert not erm.regularizers and div.regularizers[0]["name"] == "div"
  assert erm.model.to_dict() == div.model.to_dict()
  assert erm.data.to_dict() == div.data.to_dict() and erm.batch_size == div.batch_size
  # The built modules are equal dataclasses, and so the same function of the parameters.
  classes = testutil.num_classes(erm)
  assert (models.create(erm.model_name, classes, **erm.model.to_dict())
          == models.create(div.model_name, classes, **div.model.to_dict()))
  # Only the regularizer and the authors' per-method learning rate may differ.
  erm_opt, div_opt = erm.optimizer.to_dict(), div.optimizer.to_dict()
  erm_opt.pop("lr"), div_opt.pop("lr")
  assert erm_opt == div_opt and erm.schedule.to_dict() == div.schedule.to_dict()


@pytest.mark.parametrize("name,erm_arg,div_arg", [
    ("mnist_cifar", "reg=erm,data=dominoes", "reg=div,data=dominoes"),
    ("quickstart", "reg=erm", "reg=div")])
def test_erm_and_div_models_compute_the_same_logits(name, erm_arg, div_arg):
  outputs = []
  for arg in (erm_arg, div_arg):
    config = testutil.get_config(name, arg)
    model = models.create(config.model_name, 2, **config.model.to_dict())
    x = jax.random.normal(jax.random.PRNGKey(1), (2,) + testutil.image_shape(config))
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    outputs.append(_features(model, variables, x))
  np.testing.assert_array_equal(outputs[0], outputs[1])


def _features(model, variables, x):
  """Logits and pre-logits (the quickstart's zero-initialized head makes logits 0)."""
  logits, out = model.apply(variables, x, train=False)
  return np.concatenate([np.ravel(logits), np.ravel(out["pre_logits"])])


@pytest.mark.parametrize("name,arg", [("mnist_cifar", "reg=div,data=dominoes"),
                                      ("quickstart", "reg=div"), ("waterbirds", "reg=erm")])
def test_residual_argument_restores_the_last_residual(name, arg):
  """`residual=true` is the ablation: a different function of the same parameters."""
  without, with_res = testutil.get_config(name, arg), testutil.get_config(name, arg + ",residual")
  assert with_res.model.last_attn_residual is True
  if name == "waterbirds":
    return  # ViT-B/16: the field is enough; the computation is checked on the small ones.
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + testutil.image_shape(without))
  logits = []
  for config in (without, with_res):
    model = models.create(config.model_name, 2, **config.model.to_dict())
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    logits.append(_features(model, variables, x))
  assert not np.allclose(logits[0], logits[1], atol=1e-4)


def test_the_quickstart_resnet_has_no_head_eval():
  config = testutil.get_config("quickstart", "model=resnet")
  assert config.head_eval == ""


def test_quickstart_sweep_is_erm_and_div_over_seeds():
  points = testutil.load_config_module("quickstart").get_sweep("seeds=3,steps=300")
  assert [(p["reg"], p["seed"]) for p in points] == [
      (r, s) for s in range(3) for r in ("erm", "div")]
  assert {p["steps"] for p in points} == {300}
  assert {p["config.eval_every_steps"] for p in points} == {100}
  small = testutil.get_config("quickstart", "eval_examples=1000")
  assert small.data.num_val == small.data.num_test == 1000
  assert testutil.get_config("quickstart", "seed=2").seed == 2


def test_model_fields_are_json_round_trippable():
  # config.json must rebuild the same model for `heads` and `report`.
  config = testutil.get_config("mnist_cifar", "reg=div")
  assert json.loads(json.dumps(config.model.to_dict()))["last_attn_residual"] is False
