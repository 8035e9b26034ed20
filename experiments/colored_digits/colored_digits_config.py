"""The quickstart recipe (authors' architecture, head_eval on) on the coloured-digits npz made
by make_colored_digits.py: a second spurious-correlation dataset, outside the package.

  python experiments/colored_digits/make_colored_digits.py --out=/tmp/colored_digits
  COLORED_DIGITS=/tmp/colored_digits python -m vitreg_jax.sweep \
      experiments/colored_digits/colored_digits_config.py:steps=300 --workdir=/tmp/cd --local
"""
import os

from vitreg_jax import config_lib

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                          "quickstart.py")
DATA = os.environ.get("COLORED_DIGITS", "/tmp/colored_digits")  # make_colored_digits.py --out


def get_config(arg=None):
  config = config_lib.import_config(QUICKSTART).get_config(arg)
  config.model.patch_size = 8  # 32x32 -> a 4x4 grid, about the dominoes' token count
  config.data = dict(name="npz", path=DATA + "/{split}.npz",
                     splits=("train", "val_id", "val_ood", "test_id", "test_ood"),
                     train_split="train", eval_splits=("val_id", "val_ood"), augment=False)
  return config


def get_sweep(arg=None):
  return config_lib.import_config(QUICKSTART).get_sweep(arg)
