"""Pretrained weights as a run of their own: a workdir every analysis, `heads` and the report
open like a trained run (`python -m vitreg_jax.import_weights`).

The analyses rebuild a run from its workdir (`rundir.load_run`: `config.json` and a
checkpoint), so an imported model needs exactly that and nothing else: `write_run(config,
workdir)` builds the training state a run of `config` starts from (the model of
`config.model_name` / `config.model`, the data of `config.data` for its classes and image
shape), loads `config.init_from` into it as training would (`pretrained.init_state_from`:
public ViT weights, a timm ResNet with its BatchNorm statistics, the head-diversity authors'
ViT), and saves it as the checkpoint of step 0 beside the resolved config. The config names
the data the analyses read and its normalization (`data.mean` / `data.std`: what the weights
expect, e.g. timm's ImageNet mean and std, or [0, 1] for the diverse-vit checkpoints).
Training the same config in that workdir resumes from step 0: a fine-tuning run.

`timm_config(model, weights, data)` is that config for the ImageNet-pretrained timm models the
"How do ViTs work?" notebooks analyse (xxxnell/how-do-vits-work, `fourier_analysis.ipynb`,
`featuremap_variance.ipynb`, `robustness.ipynb`, `losslandscape.ipynb`: timm models,
ViT-Ti and ResNet-50 among them): `TIMM_MODELS` gives each one's vitreg_jax architecture and
the preprocessing of its timm `pretrained_cfg`:

* 'vit_ti': `vit_tiny_patch16_224` (AugReg weights): width 192, depth 12, 3 heads, MLP 768,
  patch 16, CLS token, q/k/v bias, exact GELU, LayerNorm eps 1e-6 (timm's
  `VisionTransformer`); inputs normalized with mean 0.5 / std 0.5, centre crop 0.9.
* 'resnet50': `resnet50` (`a1_in1k` weights): the post-activation bottleneck ResNet-50 with
  the 7x7 ImageNet stem (`model_name='resnet'`, `stem='imagenet'`; timm/models/resnet.py);
  ImageNet mean / std, centre crop 0.95.
The data is an ImageNet folder `<data>/<split>/<class>/<image>` (the `image_folder` dataset) at
224 px. Resizing is bilinear where timm's is bicubic: a small difference in the inputs, none in
the weights. Weights with another timm tag may want another crop or normalization: write a
config (`--config`) with its `pretrained_cfg`.
"""

import os

from absl import logging
import ml_collections

from vitreg_jax import errors
from vitreg_jax.training import checkpoint as ckpt_lib
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import optim
from vitreg_jax.training import preflight
from vitreg_jax.training import pretrained
from vitreg_jax.training import run_files
from vitreg_jax.training import rundir
from vitreg_jax.training import steps
from vitreg_jax.training import train

STEP = 0  # The imported weights are the state before any training step.
# name -> (model_name, model fields, data normalization and crop): module docstring.
TIMM_MODELS = {
    "vit_ti": ("vit", dict(variant="Ti/16", classifier="token", posemb="learn", qkv_bias=True,
                           gelu_approximate=False, layer_norm_eps=1e-6),
               dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_fraction=0.9)),
    "resnet50": ("resnet", dict(depth=50, stem="imagenet", width=64),
                 dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                      crop_fraction=0.95)),
}


def timm_config(model: str, weights: str, data: str, *, train_split: str = "train",
                eval_split: str = "val") -> ml_collections.ConfigDict:
  """The import config of the timm ImageNet model `model` (a `TIMM_MODELS` name).

  Args:
    model: 'vit_ti' or 'resnet50'.
    weights: the `.npz` / `.safetensors` of its state_dict (`tools/convert_timm.py`).
    data: the ImageNet folder (`<data>/<split>/<class>/<image>`).
    train_split: the split the Hessian and landscape analyses draw training batches from
      ('val' where only the validation set is at hand).
    eval_split: the split the other analyses read.
  """
  if model not in TIMM_MODELS:
    raise errors.UserError(f"Unknown timm model {model!r}; valid: {sorted(TIMM_MODELS)}.")
  model_name, fields, preprocessing = TIMM_MODELS[model]
  return ml_collections.ConfigDict(dict(
      model_name=model_name, model=fields,
      data=dict(name="image_folder", path=data, image_size=224, train_split=train_split,
                eval_splits=(eval_split,), **preprocessing),
      init_from=dict(path=weights, kind="timm", reset_head=False),
      # The analyses read the batch sizes; a schedule needs steps (nothing is trained here).
      batch_size=64, eval_batch_size=64, total_steps=1))


def write_run(config, workdir: str, *, prepare_data: bool = False) -> str:
  """Writes `workdir/config.json` and the step-0 checkpoint of `config.init_from`'s weights.

  Args:
    config: a training config whose `init_from` names the weights (`kind` as training reads
      it: 'npz', 'big_vision', 'timm', 'diverse_vit' or 'checkpoint').
    workdir: a new run directory (one that holds checkpoints already is refused: importing
      over a run would mix two models).
    prepare_data: prepare `config.data` first if it is not (as `main --prepare_data`).
  Returns:
    `workdir`.
  Raises:
    errors.UserError: no `init_from`, a workdir with checkpoints, or any of training's
      configuration checks (`preflight.check`), before anything is written.
  """
  config = preflight.check(config, prepare_data=prepare_data)
  if not config.init_from:
    raise errors.UserError("config.init_from is not set: name the weights to import "
                           "(config.init_from.path and .kind, e.g. kind='timm').")
  if run_files.checkpoint_steps(workdir):
    raise errors.UserError(f"{workdir} already holds checkpoints "
                           f"{run_files.checkpoint_steps(workdir)}: import into a new --workdir.")
  dataset = preflight.open_dataset(config.data)
  info = dataset.info
  model = steps.create_model(config, info.num_classes)
  total_steps, steps_per_epoch = train.num_train_steps(config, dataset)
  tx, _ = optim.make_optimizer(config, total_steps, steps_per_epoch)
  mesh = train.make_mesh(config)
  objective = objective_lib.Objective.from_config(config, model, dataset)
  state, shardings = steps.create_train_state(config, model, tx, info.image_shape, mesh,
                                              loss_state=objective.init_state)
  state = pretrained.init_state_from(config.init_from, state, shardings, tx=tx, model=model,
                                     image_hw=info.image_shape[:2])
  rundir.save_config(config, workdir)
  with ckpt_lib.Checkpointer(os.path.join(workdir, run_files.CHECKPOINT_DIR),
                             keep=config.keep_checkpoints) as checkpointer:
    checkpointer.save(STEP, state, ckpt_lib.run_meta(config, STEP), force=True)
  logging.info("Imported %s (kind %r) into %s as step %d.", config.init_from["path"],
               config.init_from.get("kind"), workdir, STEP)
  return workdir
