"""The quickstart recipe on the coloured-digits npz made by make_colored_digits.py: a second
spurious-correlation dataset, outside the package.

Model and recipe: `configs/quickstart.py`'s (`reg`, `steps`, `seed`, `div_weight` as there):
the head-diversity authors' ViT (width 64, depth 4, 4 heads, MLP 128, class token, learned
position embedding, no residual around the last block's attention), Adam 1e-3 with a cosine
schedule, batch 64, 600 steps, ERM or DIV (the authors' code variant, weight 100). One change:
patch 8, so the 32x32 images make a 4x4 grid, near the dominoes' token count. Every
evaluation scores `val_id`, `val_ood`, `test_id` and `test_ood` and, with `head_eval` on
(`'-1'`), the full model and each head of the last block alone on those four splits
(`heads_eval.jsonl`), which the authors' statistics (`heads --table`) read: choices on the
validation splits, figures on the test splits (docs/heads.md).

  python experiments/colored_digits/make_colored_digits.py --out=/tmp/colored_digits
  COLORED_DIGITS=/tmp/colored_digits python -m vitreg_jax.sweep \
      experiments/colored_digits/colored_digits_config.py:steps=300 --workdir=/tmp/cd --local
  python -m vitreg_jax.heads --table /tmp/cd/*
"""
import os

from vitreg_jax import config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                          "quickstart.py")
DATA = os.environ.get("COLORED_DIGITS", "/tmp/colored_digits")  # make_colored_digits.py --out
SPLITS = ("train", "val_id", "val_ood", "test_id", "test_ood")


def quickstart_on_npz(arg, path: str):
  """The quickstart ViT recipe (`arg` as configs/quickstart.py's) on an npz dataset written as
  `path/{split}.npz` for `SPLITS`, patch 8, evaluating the four held-out splits with
  `head_eval` on. Also the textured-digits config's (experiments/textured_digits/)."""
  config = config_lib.import_config(QUICKSTART).get_config(arg)
  if config.model_name != "vit":
    raise ValueError("this config runs the quickstart ViT only (model=vit).")
  config.model.patch_size = 8  # 32x32 -> a 4x4 grid, about the dominoes' token count
  config.data = dict(name="npz", path=os.path.join(path, "{split}.npz"), splits=SPLITS,
                     train_split="train", eval_splits=SPLITS[1:], augment=False)
  config.head_eval = "-1"  # every head of the last block alone, every evaluation
  return config


def get_config(arg=None):
  return quickstart_on_npz(arg, DATA)


def get_sweep(arg=None):
  """ERM and DIV over `seeds` seeds, as configs/quickstart.py's sweep."""
  return config_lib.import_config(QUICKSTART).get_sweep(arg)
