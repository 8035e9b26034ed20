"""Tests of the experiment configs in configs/: every file and the papers' settings.

Each config is loaded from its file (as `config_flags` does), filled with
`config_lib.with_defaults`, its data section validated by `data.get_spec` (names and options,
no files opened), its model built with `models.create` and initialized on the config's image
shape under `jax.eval_shape` (shapes only, no compute), its regularizers built and traced on
that model, and its optimizer and schedule built with `optim.make_optimizer`. No dataset is
read: the number of classes and training-set sizes are the datasets' published figures
(`testutil.DATASET_FACTS`).
"""

import functools
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import data
from vitreg_jax import models
from vitreg_jax import regularizers
from vitreg_jax.training import optim

from testutil import (  # pylint: disable=g-bad-import-order
    CONFIGS_DIR, DATASET_FACTS, ROOT, get_config, image_shape, load_config_module, num_classes,
    steps_per_epoch)

CIFAR_SIZE = 32

ARVIT_VARIANTS = (["base"] + [f"L{k}" for k in range(1, 7)] + [f"R1-{k}" for k in range(1, 7)]
                  + ["vit_tiny"])
ARVIT_DATASETS = ["imagenet_rotation", "cifar10", "cifar100", "oxford_flowers102",
                  "imagenette", "imagewoof"]

# (config file, argument) pairs that must load, build and trace.
CASES = (
    [("quickstart", None), ("quickstart", "reg=div"), ("quickstart", "model=alternet"),
     ("quickstart", "model=resnet,smoothing"), ("quickstart", "model=alternet,smoothing"),
     ("quickstart", "model=preresnet,smoothing")]
    + [("mnist_cifar", a) for a in ("reg=erm", "reg=div", "reg=div,div=code", "runlocal",
                                    "reg=div,runlocal", "reg=div,init=/ckpt/div.npz")]
    + [("waterbirds", a) for a in ("reg=erm", "reg=div,variant=S/16", "reg=div,div=code",
                                   "reg=erm,init=/ckpt/ViT-B_16.npz", "runlocal")]
    + [("arvit", f"variant={v}") for v in ARVIT_VARIANTS]
    + [("arvit", f"variant=R1-1,dataset={d}") for d in ARVIT_DATASETS]
    + [("arvit", a) for a in ("variant=L3,impl=code", "variant=R1-5,impl=code,dataset=cifar100",
                              "variant=vit_tiny,dataset=imagewoof", "variant=L6,runlocal",
                              "variant=vit_tiny,runlocal",
                              "variant=R1-2,dataset=imagenet_rotation,runlocal",
                              "variant=base,dataset=embedded_rotation",
                              "variant=L3,dataset=embedded,init=/runs/rot",
                              "variant=vit_tiny,dataset=embedded,runlocal",
                              "variant=R1-5,dataset=embedded_rotation,runlocal")]
    + [("arvit_r1", None), ("arvit_r1", "variant=R1-4,dataset=oxford_flowers102"),
       ("arvit_r1", "runlocal")]
    + [("how_vits_work", a) for a in (
        "model=vit", "model=vit,classifier=gap", "model=vit,local_window=3",
        "model=vit,local_window=5", "model=vit,local_window=8", "model=resnet",
        "model=resnet,depth=18,dataset=cifar10", "model=alternet", "model=alternet,robustness",
        "model=vit,runlocal", "model=resnet,runlocal", "model=alternet,runlocal",
        "model=vit,train_split=train[:6%]", "model=vit,patch=4", "model=resnet,smoothing",
        "model=alternet,smoothing", "model=alternet,smoothing,runlocal", "model=preresnet",
        "model=preresnet,smoothing,runlocal")]
    + [("optimizer_study", a) for a in (
        "model=vit,opt=sgd", "model=resnet,opt=sam", "model=vit,opt=adamw,lr=3e-3,wd=0",
        "model=resnet,opt=adam,data=cifar100", "model=vit,opt=sam,data=cifar100,runlocal")]
    + [("msa_buildup", a) for a in ("msa=0000", "msa=0012", None, "msa=0011,runlocal")]
    + [("baselines", a) for a in (
        None, "method=div", "method=group_dro,adjustment=2", "method=jtt,stage=identify",
        "method=jtt,stage=upweight,identification=/runs/jtt_id", "method=group_dro,runlocal",
        "method=jtt,stage=upweight,identification=/runs/erm,id_step=150",
        "method=group_dro,data=waterbirds", "method=jtt,stage=identify,data=waterbirds")])


@functools.lru_cache(maxsize=None)
def _abstract_model(model_name, model_json, classes, shape):
  """One trace of `init_with_output`: abstract variables and logits (shapes only)."""
  model = models.create(model_name, classes, **json.loads(model_json))
  images = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  (logits, _), variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False), images)
  return model, variables, logits


def build(config):
  """Model, abstract variables, logits, image shape: shape-checked, nothing computed."""
  shape = tuple(image_shape(config))
  model_json = json.dumps(config.model.to_dict(), sort_keys=True)
  return (*_abstract_model(config.model_name, model_json, num_classes(config), shape), shape)


def num_params(variables):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def test_every_config_file_is_covered():
  files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS_DIR, "*.py"))}
  assert files == {name for name, _ in CASES}, "add new config files to CASES"


@pytest.mark.parametrize("name,arg", CASES)
def test_config_builds_model_regularizers_and_optimizer(name, arg):
  config = get_config(name, arg)
  model, variables, logits, shape = build(config)
  assert num_params(variables) > 0
  assert logits.shape == (2, num_classes(config))

  reg = regularizers.build(config.regularizers, model)   # checks names, options, layers
  if config.regularizers and config.runlocal:
    # Trace the training loss's regularizer on the (small) runlocal model: the same entries
    # and depth as the full run, so this also covers the full-size configs' terms.
    images = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    _, _, total, terms, _ = jax.eval_shape(
        lambda v, x, y: reg(v, x, labels=y, train=False, rngs=None, head_mask=None,
                            mutable=False), variables, images, labels)
    assert total.shape == () and set(terms) == {r["name"] for r in config.regularizers}

  spe = steps_per_epoch(config)
  total_steps = config.total_steps or config.total_epochs * spe
  tx, schedule = optim.make_optimizer(config, total_steps, spe)
  assert float(schedule(total_steps // 2)) > 0
  opt_state = jax.eval_shape(tx.init, variables["params"])
  assert jax.tree.leaves(opt_state)

  if config.init_from is not None:
    assert config.init_from.kind in ("checkpoint", "npz", "diverse_vit") and config.init_from.path


# ------------------------------------------------------------------- papers' settings


@pytest.mark.parametrize("k", range(1, 7))
def test_arvit_rows_regularize_the_papers_layer(k):
  distance = get_config("arvit", f"variant=L{k}")
  similarity = get_config("arvit", f"variant=R1-{k}")
  for config, name, weight in ((distance, "distance", 0.01), (similarity, "similarity", 0.01)):
    assert config.model_name == "arvit" and config.model.variant == "paper"
    assert config.model.patch_size == 16 and config.data.image_size == 224
    assert config.batch_size == 80
    (entry,) = config.regularizers
    assert entry["name"] == name and tuple(entry["layers"]) == (k - 1,)
    assert entry["weight"] == weight
    model, *_ = build(config)
    reg = regularizers.build(config.regularizers, model)
    assert reg.attention_layers == (k - 1,) and reg.div_layers == ()
  # The paper's definitions by default: no authors'-code options.
  assert set(similarity.regularizers[0]) == {"name", "weight", "layers"}
  assert set(distance.regularizers[0]) == {"name", "weight", "layers"}


def test_arvit_base_vit_tiny_and_rotation_pretraining():
  base = get_config("arvit", "variant=base")
  assert base.model_name == "arvit" and not base.regularizers
  tiny = get_config("arvit", "variant=vit_tiny")
  assert tiny.model_name == "vit" and tiny.model.variant == "Ti6x12/16"
  model, variables, *_ = build(tiny)
  assert (model.depth, model.num_heads) == (6, 12)   # ARViT's blocks and heads
  assert num_params(variables) == 2_857_162          # README.md
  rotation = get_config("arvit", "variant=R1-1,dataset=imagenet_rotation")
  assert rotation.data.name == "imagenet_rotation" and num_classes(rotation) == 4
  _, variables, *_ = build(rotation)
  assert variables["params"]["head"]["kernel"].shape[-1] == 4
  assert num_params(variables) == 8_816_896          # README.md
  finetune = get_config("arvit", "variant=R1-1,dataset=cifar100,init=/runs/rot")
  assert dict(finetune.init_from) == {"path": "/runs/rot", "kind": "checkpoint"}


def test_arvit_embedded_pretraining_has_its_own_lr_warmup_and_crops():
  # Rotation pretraining on embedded data: lr 3e-4 after 100 warmup steps, whole (64 px) crops of
  # 2 x 2-tile windows (docs/embedded.md); fine-tuning keeps lr 1e-3, no warmup, native crops.
  pre = get_config("arvit", "variant=L3,dataset=embedded_rotation")
  assert pre.optimizer.lr == 3e-4 and pre.schedule.warmup_steps == 100
  assert (pre.data.downscale, pre.data.min_crop, pre.data.max_crop) == (2, 64, 64)
  # A third each of photo windows, faces and digits (the photos alone stay at chance).
  assert pre.data.faces == pre.data.digits == pytest.approx(1 / 3)
  assert get_config("arvit", "variant=L3,dataset=embedded_rotation,lr=1e-3").optimizer.lr == 1e-3
  fine = get_config("arvit", "variant=L3,dataset=embedded,init=/runs/rot")
  assert fine.optimizer.lr == 1e-3 and not fine.schedule.get("warmup_steps")
  assert "downscale" not in fine.data and "faces" not in fine.data and fine.total_steps == 500


def test_arvit_code_impl_and_weight_override():
  # The authors' protocol: their encoder at 256 px (16 x 16 grid), their penalty options
  # including the min-max normalized attention, and no penalty while fine-tuning.
  pretrain = get_config("arvit", "variant=R1-2,impl=code,dataset=imagenet_rotation")
  assert pretrain.model.variant == "code" and pretrain.data.image_size == 256
  assert (pretrain.model.width, pretrain.model.num_heads) == (512, 8)
  (entry,) = pretrain.regularizers
  assert entry["weight"] == 0.01 and entry["metric"] == "minkowski"
  assert entry["normalize_attention"] and entry["normalize_similarity"]
  assert entry["bias"] == -0.17 and entry["log"] and entry["batch_reduction"] == "sum"
  model = models.create("arvit", 4, **pretrain.model)
  assert model.token_layout((256, 256)) == (16, 16, 0)
  assert not get_config("arvit", "variant=R1-2,impl=code,dataset=cifar10").regularizers
  distance = get_config("arvit", "variant=L2,impl=code,dataset=imagenet_rotation")
  (entry,) = distance.regularizers
  assert entry["penalty"] == "smooth_sign" and entry["normalize_attention"]
  assert (distance.model.width, distance.model.num_heads) == (516, 12)
  # The paper protocol keeps the penalty in both stages.
  assert get_config("arvit", "variant=L2,dataset=cifar10").regularizers
  (entry,) = get_config("arvit", "variant=L2,weight=0.2").regularizers
  assert entry["weight"] == 0.2


def test_arvit_r1_wrapper_is_r1_1_on_cifar10():
  config = get_config("arvit_r1")
  assert config.data.name == "cifar10" and config.model_name == "arvit"
  assert [dict(r) for r in config.regularizers] == [
      dict(name="similarity", weight=0.01, layers=(0,))]
  assert get_config("arvit_r1", "variant=R1-5").regularizers[0]["layers"] == (4,)


def test_mnist_cifar_erm_and_div_match_the_authors_recipe():
  erm, div = get_config("mnist_cifar", "reg=erm"), get_config("mnist_cifar", "reg=div")
  for config in (erm, div):
    assert config.data.name == "mnist_cifar" and config.batch_size == 80
    assert config.total_epochs == 100 and config.optimizer.name == "adam"
    assert tuple(config.data.eval_splits) == ("val_id", "val_ood", "test_id", "test_ood")
    assert image_shape(config) == (64, 32, 3)
  assert erm.optimizer.lr == 1e-4 and not erm.regularizers
  assert div.optimizer.lr == 1e-3
  # Default: the authors' code's DIV (their Table 1 numbers), lambda 100 on the last block.
  (entry,) = div.regularizers
  assert entry["name"] == "div" and entry["weight"] == 100.0 and tuple(entry["layers"]) == (-1,)
  assert entry["normalize"] and entry["reduction"] == "mean"
  assert div.model.last_attn_residual is False
  model, *_ = build(div)
  assert regularizers.build(div.regularizers, model).div_layers == (model.depth - 1,)
  # Step decay x0.1 at epochs 70 and 80.
  spe = steps_per_epoch(div)
  _, schedule = optim.make_optimizer(div, 100 * spe, spe)
  lrs = [float(schedule(e * spe)) for e in (0, 69, 70, 79, 80, 99)]
  np.testing.assert_allclose(lrs, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-5)
  paper = get_config("mnist_cifar", "reg=div,div=paper")
  (entry,) = paper.regularizers
  module = load_config_module("mnist_cifar")
  assert entry["weight"] == pytest.approx(
      module.PAPER_WEIGHT_FACTOR * module.MATCHED_SCALE["mnist_cifar"])
  assert "normalize" not in entry and paper.model.last_attn_residual is False
  assert get_config("mnist_cifar", "reg=div,div=paper,weight=3").regularizers[0]["weight"] == 3.0


def test_mnist_cifar_on_the_embedded_data_and_its_lambda_sweep():
  config = get_config("mnist_cifar", "reg=div,div=paper,data=dominoes,steps=300")
  assert config.data.name == "dominoes" and image_shape(config) == (32, 16, 3)
  assert config.total_steps == 300 and tuple(config.schedule.boundaries) == (210, 240)
  module = load_config_module("mnist_cifar")
  assert config.regularizers[0]["weight"] == pytest.approx(
      module.PAPER_WEIGHT_FACTOR * module.MATCHED_SCALE["dominoes"])
  model = config.model.to_dict()  # the authors' model, unchanged (with_defaults adds fields)
  assert {k: model[k] for k in module.AUTHORS_MODEL} == module.AUTHORS_MODEL
  points = module.get_sweep("data=dominoes,seeds=2")
  assert len(points) == 12 and {p["seed"] for p in points} == {0, 1}
  paper = [p for p in points if p.get("div") == "paper"]
  weights = sorted({float(p["weight"]) for p in paper})
  np.testing.assert_allclose(np.array(weights) / module.MATCHED_SCALE["dominoes"],
                             [1, 10, 100, 1000], rtol=0.05)
  for point in points:  # every point is a valid config of this file
    arg = ",".join(f"{k}={v}" for k, v in point.items())
    assert get_config("mnist_cifar", arg).data.name == "dominoes"
  with pytest.raises(ValueError, match="data must be one of"):
    get_config("mnist_cifar", "data=cifar")


def test_mnist_cifar_poster_recipe_on_the_embedded_data():
  # The authors' recipe: batch 80, epochs of 10000 / 80 = 125 steps, evaluation after every
  # epoch, x0.1 at 70% and 80% of the epochs (on epoch boundaries), 20/80 val/test split.
  config = get_config("mnist_cifar", "reg=erm,data=dominoes,epochs=10")
  assert config.batch_size == 80 and config.total_steps == 1250
  assert config.eval_every_steps == 125
  assert tuple(config.schedule.boundaries) == (875, 1000)
  assert (config.data.num_val, config.data.num_test) == (400, 1600)
  assert config.optimizer.lr == 1e-4
  assert get_config("mnist_cifar", "reg=div,data=dominoes,epochs=10").optimizer.lr == 1e-3
  assert get_config("mnist_cifar", "reg=erm,data=dominoes,epochs=10,lr=0.001").optimizer.lr == 1e-3
  module = load_config_module("mnist_cifar")
  rate = lambda p: get_config("mnist_cifar", ",".join(f"{k}={v}" for k, v in p.items())
                              ).optimizer.lr
  points = module.get_sweep("table,epochs=4,seeds=3")
  assert len(points) == 6 and {p["seed"] for p in points} == {0, 1, 2}
  assert sorted({(p["reg"], rate(p)) for p in points}) == [("div", 1e-3), ("erm", 1e-4)]
  # The sweep command hands its own argument to every point's config too.
  assert get_config("mnist_cifar", "table,epochs=4,seeds=3,data=dominoes,reg=erm,seed=1"
                    ).total_steps == 500
  equal = module.get_sweep("table,epochs=4,seeds=1,lr=0.001")  # the equal-LR control
  assert sorted((p["reg"], rate(p)) for p in equal) == [("div", 1e-3), ("erm", 1e-3)]
  for arg in ("reg=erm,epochs=-1,data=dominoes", "reg=erm,epochs=3"):
    with pytest.raises(ValueError, match="epochs"):
      get_config("mnist_cifar", arg)


def test_mnist_cifar_uses_the_authors_model():
  # ArmandNM/diverse-vit: dim 64, depth 6, heads 4, dim_head 64, mlp 128, to_qkv without bias,
  # patch 4 on 64 x 32, CLS + learned position embedding, LayerNorm + Linear head. Their count,
  # module by module: patch Linear(48, 64) 3,136; pos 129 x 64 = 8,256; cls 64; per block
  # LN 128 + to_qkv 64 x 768 = 49,152 + proj 256 x 64 + 64 = 16,448 + LN 128
  # + FF 64 x 128 + 128 + 128 x 64 + 64 = 16,576 -> 82,432, x 6 = 494,592; head LN 128
  # + Linear(64, 2) 130.
  expected = 3_136 + 8_256 + 64 + 6 * 82_432 + 128 + 130
  config = get_config("mnist_cifar", "reg=div")
  model, variables, *_ = build(config)
  assert num_params(variables) == expected == 506_306
  attn = variables["params"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert attn["query"]["kernel"].shape == (64, 4, 64) and "bias" not in attn["query"]
  assert attn["out"]["kernel"].shape == (4, 64, 64)     # inner width 256 -> residual 64
  # PyTorch's Linear init of the head: non-zero, uniform in +-1/sqrt(64).
  head = model.init(jax.random.key(0), jnp.zeros((1, 64, 32, 3)))["params"]["head"]
  assert 0 < np.abs(head["kernel"]).max() <= 1 / 8 and np.abs(head["bias"]).max() > 0


def test_waterbirds_div_and_pretrained_init():
  config = get_config("waterbirds", "reg=div,init=/ckpt/ViT-B_16.npz")
  assert config.data.name == "waterbirds" and tuple(config.data.eval_splits) == ("val", "test")
  assert config.model.variant == "B/16" and image_shape(config) == (224, 224, 3)
  assert dict(config.init_from) == {"path": "/ckpt/ViT-B_16.npz", "kind": "npz"}
  assert config.regularizers[0]["weight"] == 100.0
  assert config.regularizers[0]["normalize"]  # the authors' recipe by default (docstring)
  assert get_config("waterbirds").init_from is None
  with pytest.raises(ValueError, match=r"div=paper on Waterbirds needs an explicit lambda"):
    get_config("waterbirds", "reg=div,div=paper")
  paper = get_config("waterbirds", "reg=div,div=paper,weight=5e9").regularizers[0]
  assert paper["weight"] == 5e9 and "normalize" not in paper


def test_optimizer_study_and_msa_buildup_points():
  sam = get_config("optimizer_study", "model=resnet,opt=sam")
  assert sam.optimizer.name == "sam" and sam.optimizer.base == "sgd"
  assert sam.optimizer.rho == 0.05 and sam.optimizer.momentum == 0.9
  adamw = get_config("optimizer_study", "model=vit,opt=adamw,lr=3e-3,wd=0")
  assert (adamw.optimizer.lr, adamw.optimizer.weight_decay) == (3e-3, 0.0)
  c100 = get_config("optimizer_study", "model=vit,opt=adam,data=cifar100")
  hvw = get_config("how_vits_work", "model=vit")   # the paper's model and data; only the optimizer
  assert c100.model == hvw.model and c100.data == hvw.data and c100.optimizer.name == "adam"
  for msa in ("0000", "0012", "0132"):
    model, *_ = build(get_config("msa_buildup", f"msa={msa}"))
    assert model.block_kinds().count("msa") == sum(map(int, msa))
  with pytest.raises(ValueError, match="at most"):
    load_config_module("msa_buildup").get_config("msa=0300")


def test_how_vits_work_variants():
  vit = get_config("how_vits_work", "model=vit")
  assert vit.data.name == "cifar100" and image_shape(vit) == (32, 32, 3)
  model, *_ = build(vit)
  assert model.token_layout((32, 32)) == (16, 16, 1)   # the authors' CIFAR ViT: patch 2
  assert vit.model.local_window is None and vit.model.classifier == "token"
  # The authors' recipe (xxxnell/how-do-vits-work, configs/cifar100_vit.yaml).
  assert (vit.batch_size, vit.optimizer.grad_clip_norm, vit.label_smoothing,
          vit.model.drop_path) == (96, 5.0, 0.1, 0.1)
  assert (vit.data.crop_padding, vit.data.randaugment) == (4, "rand-m9-n2-mstd1.0")
  assert dict(vit.data.mixup) == dict(mixup_alpha=1.0, cutmix_alpha=0.8, prob=1.0,
                                      switch_prob=0.5)
  assert get_config("how_vits_work", "model=vit,classifier=gap").model.classifier == "gap"
  local = get_config("how_vits_work", "model=vit,local_window=5")
  assert local.model.local_window == 5
  model, *_ = build(local)
  assert model.token_layout((32, 32)) == (8, 8, 1)   # the slides' 8 x 8 global MSA grid
  small = get_config("how_vits_work", "model=resnet,train_split=train[:6%]")
  assert small.data.train_split == "train[:6%]" and small.batch_size == 96
  alternet = get_config("how_vits_work", "model=alternet")
  model, *_ = build(alternet)
  assert model.block_kinds().count("msa") == 6      # Alter-ResNet-50: 0 + 1 + 3 + 2 MSAs
  # The authors' AttentionBlockB in 4 x 4 windows (7 does not divide the 16/8/4 CIFAR maps).
  assert model.msa_block == "authors" and alternet.model.msa_window == 4
  robust = get_config("how_vits_work", "model=resnet,robustness")
  assert robust.data.name == "cifar100_corrupted" and len(robust.data.corruptions) == 15
  with pytest.raises(ValueError, match="model=vit only"):
    get_config("how_vits_work", "model=resnet,classifier=gap")
  # The slides' "spatial smoothing at the end of a stage" row: the authors' blur block.
  smooth = get_config("how_vits_work", "model=resnet,smoothing")
  assert smooth.model.smoothing and smooth.model.smoothing_padding == "authors"
  model, *_ = build(smooth)
  assert model.smoothing_temperature == 10.0
  smooth = get_config("how_vits_work", "model=alternet,smoothing")
  assert smooth.model.smoothing_padding == "same"   # its 4 x 4 windows must tile the maps
  build(smooth)
  with pytest.raises(ValueError, match="smoothing applies to model=resnet, preresnet or alternet"):
    get_config("how_vits_work", "model=vit,smoothing")
  # 'resnet' is the authors' post-activation ResNet-50, 'preresnet' the pre-activation one.
  post, *_ = build(get_config("how_vits_work", "model=resnet"))
  pre, *_ = build(get_config("how_vits_work", "model=preresnet,smoothing"))
  assert (type(post).__name__, post.depth, post.stem) == ("ResNet", 50, "cifar")
  assert (type(pre).__name__, pre.depth, pre.smoothing) == ("PreResNet", 50, True)


# ----------------------------------------------------------------------- runlocal


@pytest.mark.parametrize("name,arg", [
    ("mnist_cifar", "reg=div"), ("waterbirds", "reg=div"), ("arvit", "variant=L6"),
    ("arvit", "variant=vit_tiny"), ("arvit_r1", None), ("how_vits_work", "model=vit"),
    ("how_vits_work", "model=resnet"), ("how_vits_work", "model=alternet")])
def test_runlocal_shrinks_the_run(name, arg):
  full = get_config(name, arg)
  local = get_config(name, ",".join(filter(None, [arg, "runlocal"])))
  assert local.runlocal and not full.runlocal
  assert local.total_steps is not None and local.total_steps <= 20
  assert local.batch_size < full.batch_size
  assert np.prod(image_shape(local)) <= np.prod(image_shape(full))
  _, full_vars, *_ = build(full)
  _, local_vars, *_ = build(local)
  assert num_params(local_vars) < num_params(full_vars) / 4
  assert local.regularizers == full.regularizers   # the same experiment, smaller
  _, schedule = optim.make_optimizer(local, local.total_steps, steps_per_epoch(local))
  assert float(schedule(local.total_steps // 2)) > 0


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name,arg,message", [
    ("mnist_cifar", "bogus=1", r"Unknown config argument 'bogus'.*'reg'"),
    ("mnist_cifar", "reg=irm", r"reg must be one of \('erm', 'div'\)"),
    ("waterbirds", "reg=dro", r"reg must be one of"),
    ("arvit", "variant=L7", r"variant must be one of .*'L6'.*'R1-1'.*'vit_tiny'"),
    ("arvit", "dataset=imagenet", r"dataset must be one of .*'imagenette'"),
    ("arvit", "impl=torch", r"impl must be one of \['paper', 'code'\]"),
    ("arvit_r1", "variant=R2-1", r"variant must be one of"),
    ("how_vits_work", "model=swin",
     r"model must be one of \('vit', 'resnet', 'preresnet', 'alternet'\)"),
    ("how_vits_work", "classifier=cls", r"classifier must be one of"),
    ("how_vits_work", "data_fraction=0.06", r"Unknown config argument 'data_fraction'"),
    ("baselines", "method=irm", r"method must be one of"),
    ("baselines", "stage=identify", r"add method=jtt"),
    ("baselines", "method=jtt", r"needs stage=identify or stage=upweight"),
    ("baselines", "method=jtt,stage=upweight", r"needs identification=WORKDIR"),
])
def test_bad_argument_names_the_valid_choices(name, arg, message):
  with pytest.raises(ValueError, match=message):
    load_config_module(name).get_config(arg)


@pytest.mark.parametrize("override, message", [
    ("--config.bogus=1", "bogus"),
    ("--config.loss.name=focal", "Unknown config.loss.name 'focal'; valid losses"),
])
def test_main_rejects_a_bad_override_in_one_line(tmp_path, override, message):
  result = subprocess.run(
      [sys.executable, "-m", "vitreg_jax.main", "--config=configs/mnist_cifar.py",
       override, f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert not os.listdir(tmp_path)   # failed before writing anything


def test_dataset_table_matches_the_embedded_dataset():
  # The one dataset available without preparation keeps this table honest.
  info = data.open({"name": "dominoes"}).info
  assert DATASET_FACTS["dominoes"] == (info.num_classes, info.num_examples["train"],
                                       tuple(info.image_shape))
