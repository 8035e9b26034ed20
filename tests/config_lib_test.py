"""Tests for config defaults, validation and config-argument parsing."""

import ml_collections
import pytest

from vitreg_jax import config_lib


def test_defaults_filled_and_overrides_kept():
  cfg = config_lib.with_defaults(ml_collections.ConfigDict({"total_steps": 5, "seed": 3}))
  assert cfg.seed == 3 and cfg.total_steps == 5
  assert cfg.optimizer.name == "adam" and cfg.regularizers == []


def test_unknown_top_level_key_names_valid_fields():
  with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['lerning_rate'\].*"
                                       r"Valid top-level fields"):
    config_lib.with_defaults(ml_collections.ConfigDict({"total_steps": 1, "lerning_rate": 1}))


def test_exactly_one_length_field():
  with pytest.raises(ValueError, match="exactly one"):
    config_lib.with_defaults(ml_collections.ConfigDict({}))
  with pytest.raises(ValueError, match="exactly one"):
    config_lib.with_defaults(ml_collections.ConfigDict({"total_steps": 1, "total_epochs": 1}))


def test_parse_arg_types_and_errors():
  arg = config_lib.parse_arg("variant=S/16,runlocal,steps=7,lr=0.5",
                             variant="Ti/16", runlocal=False, steps=1, lr=1.0)
  assert (arg.variant, arg.runlocal, arg.steps, arg.lr) == ("S/16", True, 7, 0.5)
  with pytest.raises(ValueError, match="Valid arguments"):
    config_lib.parse_arg("varient=S/16", variant="Ti/16")


import glob  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import subprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _parse_command_line(config_arg, *overrides):
  """Parses `--config=... --config.x=...` exactly as vitreg_jax.main does."""
  argv = ["prog", f"--config={config_arg}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values["config"].parser = config_lib.ConfigFileParser()
  values(argv)
  return values.config


def test_parse_arg_is_strict_about_types():
  with pytest.raises(ValueError, match=r"runlocal='ture' is not a boolean"):
    config_lib.parse_arg("runlocal=ture", runlocal=False)
  assert not config_lib.parse_arg("runlocal=false", runlocal=True).runlocal
  with pytest.raises(ValueError, match=r"steps='7x' is not a valid int"):
    config_lib.parse_arg("steps=7x", steps=1)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_takes_documented_overrides_and_dtype_argument(path):
  from vitreg_jax import models  # pylint: disable=g-import-not-at-top
  plain = config_lib.load_config_file(path)
  fields = models.field_names(models.MODELS[plain.model_name])
  model_overrides = ["--config.model.dtype=float16"] + [
      f for name, f in (("remat", "--config.model.remat=True"),
                        ("drop_path", "--config.model.drop_path=0.25")) if name in fields]
  config = _parse_command_line(
      f"{path}:dtype=bfloat16", *model_overrides, "--config.sharding.fsdp=True",
      "--config.sharding.fsdp_min_size=64", "--config.profile=True",
      "--config.init_from.path=/ckpt/run", "--config.head_mask=[[1, 0], [1, 1]]",
      "--config.optimizer.weight_decay=0.05", "--config.total_steps=7",
      "--config.total_epochs=None")
  assert config_lib.load_config_file(f"{path}:dtype=bfloat16").model.dtype == "bfloat16"
  resolved = config_lib.with_defaults(config)
  assert resolved.model.dtype == "float16"  # The flag wins over the config argument.
  assert resolved.sharding.to_dict() == {"fsdp": True, "fsdp_min_size": 64}
  assert resolved.profile and resolved.total_steps == 7 and resolved.total_epochs is None
  assert resolved.init_from.to_dict() == {"path": "/ckpt/run"}
  assert resolved.head_mask == [[1, 0], [1, 1]]
  assert resolved.optimizer.weight_decay == 0.05
  if "remat" in fields:
    assert resolved.model.remat is True and resolved.model.drop_path == 0.25
  # Without overrides, the command line resolves to what the config file says.
  assert config_lib.with_defaults(plain).to_dict() == config_lib.with_defaults(
      _parse_command_line(path)).to_dict()


def test_bad_dtype_argument_is_refused():
  with pytest.raises(ValueError, match=r"dtype='bf16'.*bfloat16"):
    config_lib.load_config_file(os.path.join(ROOT, "configs", "quickstart.py:dtype=bf16"))


def test_unknown_override_on_the_command_line_is_a_clean_message(tmp_path):
  res = subprocess.run(
      [sys.executable, "-m", "vitreg_jax.main", "--config=configs/quickstart.py:runlocal",
       f"--workdir={tmp_path}/w", "--config.model.dtpye=bfloat16"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 1
  assert "Unknown config field config.model.dtpye" in res.stderr
  assert "'dtype'" in res.stderr and "Traceback" not in res.stderr
  assert not os.path.exists(tmp_path / "w")  # Nothing ran.


@pytest.mark.parametrize("model_name", ["resnet", "alternet"])
def test_attention_regularizer_on_a_model_without_attention_maps_fails_at_config_time(
    model_name):
  """`resnet` has no attention: the error says so when the config is read, not later."""
  from vitreg_jax import regularizers
  config = ml_collections.ConfigDict(dict(
      model_name=model_name, model={"depth": 18} if model_name == "resnet" else {},
      total_steps=1,
      regularizers=[dict(name="div", weight=1.0, layers=(-1,))]))
  with pytest.raises(ValueError, match=r"(?s)Attention regularizers \['div'\] need an "
                                       r"attention model.*\['arvit', 'vit'\].*"
                                       rf"model '{model_name}' has none"):
    config_lib.with_defaults(config)
  config.model_name = "vit"
  config.model = {}
  assert config_lib.with_defaults(config).regularizers[0]["name"] == "div"
  # The same check guards regularizers.build for models built directly.
  from vitreg_jax import models
  model = models.create("resnet", 10, depth=18)
  with pytest.raises(ValueError, match="need an attention model"):
    regularizers.build([dict(name="distance", weight=1.0, layers=(0,))], model)
