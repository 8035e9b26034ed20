r"""Quickstart: a small ViT trained with ERM on the embedded dominoes data (no download).

Each 32x16 image stacks a simple spurious half (a digit) on a harder robust half (a photo
crop); the label is the robust class and in training the digit agrees with it 90% of the
time. ERM learns the shortcut: in-distribution accuracy is high, OOD accuracy (digit random)
is far lower. Runs in a few minutes on a 2-core CPU:

  python -m vitreg_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart

Arguments (`--config=configs/quickstart.py:steps=200,reg=div`): `steps`, `reg` ('erm' or
'div', the head-diversity regularizer on the last block), `div_weight` (DIV's weight),
`seed`, `eval_examples` (examples per validation and test split; 0 = the dataset's 2000),
`runlocal` (a 30-step smoke run), `seeds` (the sweep's number of seeds, below), `model` ('vit', default, 'resnet': a narrow
ResNet-18, post-activation as the "How do ViTs work?" authors' (models/resnet.py; as `resnet`
everywhere in this library), 'preresnet': the same pre-activation (this config's `resnet` before
issue 26), or 'alternet': a small AlterNet (ResNet bottleneck stages 1-2-2-2
of width 16 whose stages 2-4 end in an MSA block, 2 x 2 windows, which tile the 16 x 8 ... 4 x 2
maps), to contrast with the ViT in the analyses of docs/analysis.md; `reg=div` needs the ViT),
`smoothing` (CNNs: the authors' spatial-smoothing block at stage ends, placed as theirs: every
stage of `resnet`, every stage but the last of `preresnet` / `alternet`; models/resnet.py).
`residual` (keep the residual around the last block's attention).

The ViT is the head-diversity authors' architecture: no residual around the last block's
attention, in ERM and DIV alike (ArmandNM/diverse-vit, diverse_vit/models/vision_transformer.py,
`Transformer.forward`), so ERM and DIV differ only in the regularizer, and masking a head of
the last block changes the whole residual stream (with the residual, each head alone scores
within a point or two of the full model and selection has nothing to choose). Every
evaluation also scores the full model and each head of the last block alone
(`config.head_eval = '-1'`, written to heads_eval.jsonl) on the four splits (validation and
test, ID and OOD), for the authors' statistics (docs/heads.md).

DIV here is the authors' code's normalized variant (per-token cosine of the head input
gradients, squared, mean over batch x heads x heads: a term in [0, 1]), with the model and
everything else as in ERM. The paper's raw sum (`normalize=False, reduction='sum'`) is ~1e-9
on this model, so at any sane weight it changes nothing. Weight 100 is the authors'
MNIST-CIFAR value for this recipe, not yet tuned here (tune it on `val_ood` only, see
docs/heads.md). The zero-initialized head makes every head's gradient, hence DIV's, zero at
step 0; it acts from the first steps on. `train/reg/div` in the logs is the unweighted term
(seed 0: 2.8e-4 at step 100, 2.6e-5 at step 200, vs cross-entropy 0.62 and 0.26).

"""

from vitreg_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=600, reg="erm", div_weight=100.0, runlocal=False,
                             model="vit", smoothing=False, residual=False, seed=0,
                             eval_examples=0, seeds=3)  # seeds: get_sweep's, unused here
  config = config_lib.ml_collections.ConfigDict()
  config.seed = arg.seed
  config.model_name = arg.model
  if arg.model == "vit":
    config.model = dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=4,
                        classifier="token", posemb="learn", last_attn_residual=arg.residual)
  elif arg.model in ("resnet", "preresnet"):
    config.model = dict(depth=18, width=16, stem="cifar")
  elif arg.model == "alternet":
    config.model = dict(stem="cifar", width=16, blocks_per_stage=(1, 2, 2, 2),
                        msa_per_stage=(0, 1, 1, 1), head_dim=8, msa_window=2)
  else:
    raise ValueError("model must be 'vit', 'resnet', 'preresnet' or 'alternet', got "
                     f"{arg.model!r}.")
  if arg.smoothing:
    if arg.model == "vit":
      raise ValueError("smoothing applies to model=resnet, preresnet or alternet, not the ViT.")
    # AlterNet's windows must tile the maps: keep their size ('same'; models/alternet.py).
    config.model = dict(config.model, smoothing=True,
                        smoothing_padding="same" if arg.model == "alternet" else "authors")
  # Dataset options listed here can be overridden on the command line, e.g.
  # --config.data.spurious_agreement=0.5 (see the README's dominoes options).
  config.data = dict(name="dominoes", train_split="train",
                     eval_splits=("val_id", "val_ood"), spurious_agreement=0.9,
                     num_train=10000)
  if arg.eval_examples > 0:  # smaller evaluation splits (default 2000 each), for slow CPUs
    config.data.update(num_val=arg.eval_examples, num_test=arg.eval_examples)
  config.batch_size = 64
  config.eval_batch_size = 500
  config.total_steps = 30 if arg.runlocal else arg.steps
  config.optimizer = dict(name="adam", lr=1e-3, grad_clip_norm=1.0)
  config.schedule = dict(name="cosine", warmup_steps=min(50, config.total_steps // 10))
  if arg.reg == "div":
    config_lib.set_div_regularizer(config, impl="code", weight=arg.div_weight)
  elif arg.reg != "erm":
    raise ValueError(f"reg must be 'erm' or 'div', got {arg.reg!r}.")
  # Every head of the last block alone at each evaluation (heads_eval.jsonl); no heads in a
  # ResNet.
  config.head_eval = "-1" if arg.model == "vit" else ""
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  return config


def get_sweep(arg=None):
  """The head-selection table's runs: ERM and DIV over `seeds` seeds (`steps` each).

    python -m vitreg_jax.sweep configs/quickstart.py --workdir=runs/qs --local
    python -m vitreg_jax.heads --table runs/qs/*
  """
  # The sweep's argument also reaches get_config (vitreg_jax.sweep), so the two take the same
  # arguments: `steps`, `eval_examples` and `seeds` (which get_config ignores).
  arg = config_lib.parse_arg(arg, steps=600, eval_examples=0, seeds=3)
  # Three evaluations (the authors' statistics choose among them), as at the default 600 steps.
  return [{"reg": reg, "seed": seed, "steps": arg.steps, "eval_examples": arg.eval_examples,
           "config.eval_every_steps": max(arg.steps // 3, 1)}
          for seed in range(arg.seeds) for reg in ("erm", "div")]
