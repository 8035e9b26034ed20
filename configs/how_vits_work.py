r"""CIFAR comparisons of "How do Vision Transformers Work?" (Park & Kim, ICLR 2022).

(papers/how-do-vits-work-slides.txt.) One config for the paper's CIFAR-100 experiments:
ViT vs ResNet vs AlterNet (Fig. 12), the GAP vs CLS classifier ("GAP improves accuracy by
+2.7%"), and ViT with local MSAs of kernel 3 x 3, 5 x 5 against the global 8 x 8 (Fig. 3-4:
"5 x 5 outperforms 8 x 8; 3 x 3 is worse than 5 x 5 but better than 8 x 8").

  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=vit --workdir=/runs/vit
  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=vit,classifier=gap \
      --workdir=/runs/vit_gap
  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=vit,local_window=5 \
      --workdir=/runs/vit_local5
  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=resnet --workdir=/runs/r50
  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=resnet,smoothing \
      --workdir=/runs/r50_smooth
  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=preresnet --workdir=/runs/pr50
  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=alternet,robustness \
      --workdir=/runs/alternet
  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=vit,train_split=train[:6%] \
      --workdir=/runs/vit_6pct
  python -m vitreg_jax.main --config=configs/how_vits_work.py:model=vit,runlocal \
      --workdir=/tmp/hvw_local

Arguments (`:key=value,...`):
  model         'vit' (ViT-Ti, patch 2: a 16 x 16 grid on 32 px, the authors' CIFAR ViT) |
                'resnet' (the authors' post-activation ResNet-50, CIFAR stem: what the slides
                compare with; their models/resnet.py, `dnn_50`, `get_model('resnet_50')`) |
                'preresnet' (pre-activation ResNet-50, their models/preresnet.py; this
                config's `resnet` before, AlterNet's backbone) | 'alternet' (Alter-ResNet-50,
                Fig. 11, with the authors' MSA block `AttentionBlockB`, models/alternet.py;
                windows of 4 x 4: the authors' default window 7 does not divide the 16 x 16,
                8 x 8 and 4 x 4 maps of the MSA stages at 32 px, and their CIFAR config
                (configs/cifar100_general.yaml, `block: {}`) sets no other value, so 4, which
                tiles all three, is our choice).
  classifier    ViT only: 'token' (CLS, default) | 'gap' (global average pooling).
  local_window  ViT only: 0 (default, global MSA) | k: each patch token attends to a k x k
                window of the patch grid. With a window the ViT uses patch 4 (an 8 x 8 grid,
                so 8 is the global MSA of the slides' "8 x 8 kernel (Global MSA)"; 3, 5 the
                local ones) unless `patch` says otherwise.
  patch         ViT patch size; 0 (default): 2, or 4 with a local window.
  depth         ResNet / PreResNet depth (50 default; 18 for a quick baseline).
  smoothing     CNNs: the slides' "applying spatial smoothing at the end of a stage improves
                accuracy": the authors' blur block (models/smoothing_block.py,
                `TanhBlurBlock`: 10 tanh(x / 10), ReLU, 2x2 average pool with stride 1) placed
                as theirs: after every stage of the post-activation `resnet`
                (models/resnet.py, `num_sblocks=(1, 1, 1, 1)`), after every stage but the
                last of the pre-activation `preresnet` and AlterNet (models/preresnet.py,
                `(1, 1, 1, 0)`). The ResNets pad as theirs (each smoothed map grows by one
                pixel); AlterNet keeps the map size (`smoothing_padding='same'`) so its 4 x 4
                windows still tile the maps (their AlterNet has no smoothing option).
  dataset       'cifar100' (default) | 'cifar10'.
  train_split   'train' (default) or a slice in TFDS syntax for the small-data runs, e.g.
                `train_split=train[:6%]` (the "6% dataset" of Fig. 4; the first 6% of TFDS's
                stored order, a fixed pseudo-random sample) or `train[:5000]`.
  robustness    train on the clean set but evaluate at the end on its corrupted version
                (`<dataset>_corrupted`, the 15 benchmark corruptions x 5 severities; the
                "Robustness" axis of Fig. 12 is the mean accuracy over them).
  epochs        300 (default).
  seed          run seed.
  runlocal      10 steps, batch 8, narrow 2-block ViT / ResNet-18 width 16 / small AlterNet.

Earlier workdirs of `model=resnet` (before the post-activation ResNet, issue 26) hold a
pre-activation ResNet: set `model_name` to 'preresnet' in their config.json to read them.

Recipe: the authors' (the slides give none). Source: xxxnell/how-do-vits-work,
`configs/cifar100_vit.yaml` ("the configuration ... mostly used in the paper ... for both
CNNs and ViTs"; `cifar10_vit.yaml` for CIFAR-10), the same for every model: AdamW, lr 1.25e-4,
weight decay 0.05, batch 96, cosine decay over 300 epochs after 5 warmup epochs, gradient
clipping at global norm 5, label smoothing 0.1; data: pad-4 random crop and horizontal flip,
RandAugment `rand-m9-n2-mstd1.0` (timm's policy, `vitreg_jax/data/randaugment.py`),
Mixup (alpha 1.0) or CutMix (alpha 0.8) on every batch (`vitreg_jax/data/mixing.py`),
normalization with the CIFAR mean/std of their configs; the ViT with patch 2 and stochastic
depth 0.1 and no q/k/v bias (timm's `VisionTransformer(qkv_bias=False)` in their code).
Differences that remain: their warmup epochs come before the 300 cosine epochs
(here the 5 are inside the 300), and stochastic depth 0.1 is applied to the ViT and to
AlterNet's MSA blocks only (the ResNets and AlterNet's conv blocks have none; their ResNet's
`sd` is 0 too).

The Hessian, Fourier and noise analyses are commands over a trained run's workdir
(`python -m vitreg_jax.analysis.hessian --workdir=DIR`, docs/analysis.md), not configs.
"""

from vitreg_jax import config_lib

MODELS = ("vit", "resnet", "preresnet", "alternet")
CLASSIFIERS = ("token", "gap")
DATASETS = ("cifar100", "cifar10")


def authors_augmentation(data: dict, dataset: str) -> dict:
  """The authors' CIFAR augmentation and normalization on top of a data config."""
  from vitreg_jax.data import finetune  # pylint: disable=g-import-not-at-top
  mean, std = ((finetune.CIFAR100_MEAN, finetune.CIFAR100_STD) if dataset == "cifar100"
               else (finetune.CIFAR10_MEAN, finetune.CIFAR10_STD))
  return dict(data, crop_padding=4, randaugment="rand-m9-n2-mstd1.0", mean=mean, std=std,
              mixup=dict(mixup_alpha=1.0, cutmix_alpha=0.8, prob=1.0, switch_prob=0.5))


def get_config(arg=None):
  """Returns the CIFAR config of one "How do ViTs work?" comparison (argument string `arg`)."""
  arg = config_lib.parse_arg(arg, model="vit", classifier="token", local_window=0, patch=0,
                             depth=50, dataset="cifar100", train_split="train",
                             robustness=False, epochs=300, seed=0, runlocal=False,
                             smoothing=False)
  if arg.model not in MODELS:
    raise ValueError(f"model must be one of {MODELS}, got {arg.model!r}.")
  if arg.classifier not in CLASSIFIERS:
    raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {arg.classifier!r}.")
  if arg.dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {arg.dataset!r}.")
  if arg.model != "vit" and (arg.classifier != "token" or arg.local_window or arg.patch):
    raise ValueError("classifier, local_window and patch apply to model=vit only "
                     f"(got model={arg.model!r}).")
  if arg.smoothing and arg.model == "vit":
    raise ValueError("smoothing applies to model=resnet, preresnet or alternet (a blur at "
                     "the end of CNN stages), not the ViT.")
  if arg.local_window < 0:
    raise ValueError(f"local_window must be 0 (global) or a window size k > 0, got "
                     f"{arg.local_window}.")

  config = config_lib.ml_collections.ConfigDict()
  config.seed = arg.seed
  config.runlocal = arg.runlocal
  config.model_name = arg.model
  if arg.model == "vit":
    patch = arg.patch or (4 if arg.local_window else 2)
    config.model = dict(variant=f"Ti/{patch}", classifier=arg.classifier, posemb="learn",
                        local_window=arg.local_window or None, drop_path=0.1,
                        qkv_bias=False)  # timm VisionTransformer(qkv_bias=False) in their code.
  elif arg.model in ("resnet", "preresnet"):
    config.model = dict(depth=arg.depth, stem="cifar")
  else:
    # Alter-ResNet-50 (CCC | CCCM | CMCMCM | CMCM) with the authors' MSA block; window 4, since
    # their default 7 does not tile the 16/8/4 maps of a 32-px input (see module docstring).
    config.model = dict(stem="cifar", msa_window=4, drop_path=0.1)
  config.data = authors_augmentation(dict(name=arg.dataset, train_split=arg.train_split),
                                     arg.dataset)
  if arg.robustness:
    from vitreg_jax.data import corrupted  # pylint: disable=g-import-not-at-top
    config.data = authors_augmentation(
        dict(name=f"{arg.dataset}_corrupted", train_split=arg.train_split,
             corruptions=(corrupted.BENCHMARK_CORRUPTIONS_100 if arg.dataset == "cifar100"
                          else corrupted.BENCHMARK_CORRUPTIONS_10)), arg.dataset)
  config.batch_size = 96
  config.eval_batch_size = 500
  config.total_epochs = arg.epochs
  config.optimizer = dict(name="adamw", lr=1.25e-4, weight_decay=0.05, grad_clip_norm=5.0)
  config.schedule = dict(name="cosine", warmup_epochs=5)
  config.label_smoothing = 0.1
  config.log_every_steps = 100
  # Robustness evaluation covers 76 splits: only at the end of training.
  config.eval_every_steps = 10**9 if arg.robustness else 2000
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 2

  if arg.runlocal:
    if arg.model == "vit":
      config.model = dict(config.model.to_dict(), variant=None, patch_size=4, width=48,
                          depth=2, num_heads=3, mlp_dim=96)
    elif arg.model in ("resnet", "preresnet"):
      config.model = dict(depth=18, stem="cifar", width=16)
    else:
      config.model = dict(stem="cifar", width=16, blocks_per_stage=(1, 2, 2, 2),
                          msa_per_stage=(0, 1, 1, 1), head_dim=8, msa_window=4)
    config_lib.set_runlocal(config, eval_every=10**9 if arg.robustness else None)
  if arg.smoothing:
    config.model = dict(config.model, smoothing=True,
                        smoothing_padding="same" if arg.model == "alternet" else "authors")
  return config
