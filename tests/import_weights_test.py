"""Imported PyTorch weights reproduce their models' logits, and every analysis runs on them.

The fixtures (tests/fixtures/make_import_fixtures.py, run once in the torch virtualenv) are tiny
randomly initialised PyTorch models saved through the converters a user runs
(tools/convert_diverse_vit.py, tools/convert_timm.py), with the PyTorch logits of a seeded
batch: the head-diversity authors' DiverseViT, a timm ViT-Ti and a timm bottleneck ResNet.
No torch here: the reference is PyTorch's own forward pass, stored.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from vitreg_jax import config_lib
from vitreg_jax import errors
from vitreg_jax import models
from vitreg_jax.models import convert
from vitreg_jax.models import weight_layouts
from vitreg_jax.training import imported
from vitreg_jax.training import rundir

import testutil

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# The data each timm fixture is imported with (2 classes, its input size): dominoes' 32 x 16
# for the ViT; for the ResNet, whose last stage needs 64 x 64 inputs to keep a 2 x 2 map, a
# small `npz` dataset (`_npz_data`) normalized with ImageNet's mean and std, as timm's.
VIT_DATA = dict(name="dominoes", num_train=64, num_val=32, num_test=32, eval_splits=("val_id",))


def _npz_data(folder, hw=(64, 64), **normalization):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    np.savez(os.path.join(folder, f"{split}.npz"),
             images=rng.integers(0, 256, (32, *hw, 3), dtype=np.uint8),
             labels=np.arange(32) % 2)
  normalization = normalization or dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  return dict(name="npz", path=os.path.join(folder, "{split}.npz"), splits=("train", "test"),
              augment=False, eval_splits=("test",), **normalization)


def _io(name):
  with np.load(os.path.join(FIXTURES, f"{name}_io.npz")) as f:
    return f["image"], f["logits"], json.loads(str(f["config"]))


def _import_config(name, data=VIT_DATA, **init):
  _, _, fields = _io(name)
  return ml_collections.ConfigDict(dict(
      model_name=fields["model_name"], model=fields["model"], data=data, batch_size=8,
      eval_batch_size=16, total_steps=1, init_from=dict(
          path=os.path.join(FIXTURES, f"{name}.npz"), kind="timm", **init)))


@pytest.fixture(scope="module")
def imported_runs(tmp_path_factory):
  """The two timm fixtures imported as runs (`import_weights`' work), by fixture name."""
  root = tmp_path_factory.mktemp("imported")
  data = {"timm_vit": VIT_DATA, "timm_resnet": _npz_data(str(tmp_path_factory.mktemp("npz")))}
  return {name: imported.write_run(_import_config(name, data[name], reset_head=False),
                                   str(root / name)) for name in data}


def test_diverse_vit_logits_equal_the_authors_model():
  image, logits, fields = _io("diverse_vit")
  model = models.create("vit", 2, **fields["vit"])
  params = testutil.np_init(model, image)["params"]
  path = os.path.join(FIXTURES, "diverse_vit.npz")
  assert weight_layouts.detect(weight_layouts.read(path)) == "diverse_vit"
  params = convert.load_vit(path, params, model=model, image_hw=image.shape[1:3],
                            reset_head=False)
  ours, _ = model.apply({"params": params}, image)
  np.testing.assert_allclose(np.asarray(ours), logits, rtol=0, atol=1e-5)


def test_diverse_vit_imported_as_a_run_with_the_authors_scaling(tmp_path):
  """`configs/mnist_cifar.py:init=...`'s two settings (kind 'diverse_vit', [0, 1] inputs) on
  a dataset of the fixture's size: the run's logits are theirs, and its normalization maps
  pixels to [0, 1] as their `ToTensor()`."""
  image, logits, fields = _io("diverse_vit")
  mnist_cifar = testutil.load_config_module("mnist_cifar")
  config = ml_collections.ConfigDict(dict(
      model_name="vit", model=fields["vit"], batch_size=8, total_steps=1,
      data=_npz_data(str(tmp_path), image.shape[1:3], **mnist_cifar.UNIT_RANGE),
      init_from=dict(path=os.path.join(FIXTURES, "diverse_vit.npz"), kind="diverse_vit",
                     reset_head=False)))
  run = rundir.load_run(imported.write_run(config, str(tmp_path / "run")))
  ours, _ = run.model.apply(run.variables, image)
  np.testing.assert_allclose(np.asarray(ours), logits, rtol=0, atol=1e-5)
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  np.testing.assert_allclose(run.dataset.normalization.host(pixels), pixels / 255.0, atol=1e-6)


def test_diverse_vit_with_the_residual_differs():
  """The missing residual is the model's, not the file's: loading their weights into a ViT
  with it gives other logits (so the test above checks the architecture too)."""
  image, logits, fields = _io("diverse_vit")
  model = models.create("vit", 2, **dict(fields["vit"], last_attn_residual=True))
  params = convert.load_vit(os.path.join(FIXTURES, "diverse_vit.npz"),
                            testutil.np_init(model, image)["params"], model=model,
                            image_hw=image.shape[1:3], reset_head=False)
  ours, _ = model.apply({"params": params}, image)
  assert np.abs(np.asarray(ours) - logits).max() > 1e-3


@pytest.mark.parametrize("change,message", [
    (dict(num_heads=5), "num_heads=5"),                 # 24 q/k/v rows do not split in 5
    (dict(head_dim=8), "does not fit the model"),       # the model's kernels are narrower
    (dict(mlp_dim=64), "MlpBlock_0/Dense_0/kernel")])
def test_diverse_vit_into_another_geometry_is_a_user_error(change, message):
  image, _, fields = _io("diverse_vit")
  model = models.create("vit", 2, **dict(fields["vit"], **change))
  with pytest.raises(errors.UserError, match=message):
    convert.load_vit(os.path.join(FIXTURES, "diverse_vit.npz"),
                     testutil.np_init(model, image)["params"], model=model,
                     image_hw=image.shape[1:3], reset_head=False)


@pytest.mark.parametrize("name", ["timm_vit", "timm_resnet"])
def test_imported_run_reproduces_timm_logits(imported_runs, name):
  image, logits, _ = _io(name)
  run = rundir.load_run(imported_runs[name])
  assert run.step == imported.STEP
  ours, _ = run.model.apply(run.variables, image)
  np.testing.assert_allclose(np.asarray(ours), logits, rtol=0, atol=1e-5)


def test_resnet_batch_statistics_are_imported(imported_runs):
  """The running statistics come from the file (a fresh model has mean 0, var 1)."""
  run = rundir.load_run(imported_runs["timm_resnet"])
  with np.load(os.path.join(FIXTURES, "timm_resnet.npz")) as f:
    np.testing.assert_array_equal(run.variables["batch_stats"]["stem_norm"]["var"],
                                  f["bn1.running_var"])
    np.testing.assert_array_equal(
        run.variables["batch_stats"]["stage2_block0"]["BatchNorm_1"]["mean"],
        f["layer2.0.bn2.running_mean"])


def test_timm_resnet_into_another_width_names_the_arrays(tmp_path):
  config = _import_config("timm_resnet", _npz_data(str(tmp_path)))
  config.model.width = 8
  with pytest.raises(errors.UserError, match="stage1_block0/Conv_0/kernel"):
    imported.write_run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")  # nothing written


def test_import_refuses_a_run_with_checkpoints(imported_runs):
  with pytest.raises(errors.UserError, match="already holds checkpoints"):
    imported.write_run(_import_config("timm_vit"), imported_runs["timm_vit"])


def test_import_needs_init_from(tmp_path):
  config = _import_config("timm_vit")
  config.init_from = None
  with pytest.raises(errors.UserError, match="init_from is not set"):
    imported.write_run(config, str(tmp_path / "run"))


def test_import_command_writes_a_run_and_refuses_a_second(tmp_path):
  config_file = tmp_path / "import_vit.py"
  config_file.write_text(
      "import ml_collections\n\n\ndef get_config():\n"
      f"  return ml_collections.ConfigDict({_import_config('timm_vit').to_dict()!r})\n")
  argv = [sys.executable, "-m", "vitreg_jax.import_weights", f"--config={config_file}",
          f"--workdir={tmp_path / 'run'}"]
  first = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "wrote" in first.stdout and rundir.load_run(str(tmp_path / "run")).step == 0
  second = subprocess.run(argv, capture_output=True, text=True, check=False)
  assert second.returncode == 1 and "Traceback" not in second.stderr
  assert "already holds checkpoints" in second.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("analysis", ["fourier", "variance", "noise", "landscape", "hessian"])
@pytest.mark.parametrize("name", ["timm_vit", "timm_resnet"])
def test_every_analysis_runs_on_an_imported_run(imported_runs, tmp_path, name, analysis):
  testutil.run_analysis_main(analysis, *testutil.TINY_ANALYSIS_ARGS[analysis],
                             f"--workdir={imported_runs[name]}", f"--out={tmp_path}")
  result = json.load(open(tmp_path / f"{analysis}.json"))
  assert result["runs"] and os.listdir(tmp_path) != [f"{analysis}.json"]  # JSON and figure
  leaves = [x for x in jax.tree.leaves(result["runs"]) if isinstance(x, float)]
  assert leaves and np.all(np.isfinite(leaves))


def test_mnist_cifar_init_sets_the_authors_scaling_and_weights():
  config = testutil.get_config("mnist_cifar", "reg=div,init=/ckpt/div.npz")
  assert dict(config.init_from) == dict(path="/ckpt/div.npz", kind="diverse_vit",
                                        reset_head=False)
  assert tuple(config.data.mean) == (0.0, 0.0, 0.0) and tuple(config.data.std) == (1.0,) * 3
  assert config.model.layer_norm_eps == 1e-5 and not config.model.last_attn_residual
  plain = testutil.get_config("mnist_cifar", "reg=div")
  # Every row trains on the authors' [0, 1] pixels too, the embedded dominoes included.
  assert not plain.init_from and tuple(plain.data.mean) == (0.0,) * 3
  dominoes = testutil.get_config("mnist_cifar", "reg=erm,data=dominoes,epochs=2")
  assert tuple(dominoes.data.mean) == (0.0,) * 3 and tuple(dominoes.data.std) == (1.0,) * 3
  with pytest.raises(ValueError, match="data=mnist_cifar"):
    testutil.get_config("mnist_cifar", "data=dominoes,init=/ckpt/div.npz")


@pytest.mark.parametrize("model", sorted(imported.TIMM_MODELS))
def test_timm_presets_build_timm_geometry(model):
  config = config_lib.with_defaults(imported.timm_config(model, "/ckpt/x.npz", "/data/in"))
  net = models.create(config.model_name, 1000, **config.model.to_dict())
  shapes = jax.eval_shape(net.init, jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  # timm's parameter counts: vit_tiny_patch16_224 5,717,416; resnet50 25,557,032.
  assert count == {"vit_ti": 5717416, "resnet50": 25557032}[model]
  assert config.init_from.kind == "timm" and config.data.name == "image_folder"


def test_import_command_timm_needs_weights_and_data(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "vitreg_jax.import_weights", "--timm=vit_ti",
       f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "--timm needs --weights" in result.stderr.strip().splitlines()[-1]
  assert not os.path.exists(tmp_path / "run")
