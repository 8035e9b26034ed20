"""The quickstart recipe on the textured-digits npz made by make_textured_digits.py (a texture
shortcut; the third spurious-correlation dataset, outside the package).

Model, recipe and evaluation as experiments/colored_digits/colored_digits_config.py
(`quickstart_on_npz`): configs/quickstart.py's ViT and training (`reg`, `steps`, `seed`,
`div_weight` as there), patch 8, every evaluation on `val_id`, `val_ood`, `test_id`,
`test_ood` with `head_eval` on (each head of the last block alone, `heads_eval.jsonl`).

  python experiments/textured_digits/make_textured_digits.py --out=/tmp/textured_digits
  TEXTURED_DIGITS=/tmp/textured_digits python -m vitreg_jax.sweep \
      experiments/textured_digits/textured_digits_config.py:steps=300 --workdir=/tmp/td --local
  python -m vitreg_jax.heads --table /tmp/td/*
"""
import os

from vitreg_jax import config_lib

COLORED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "colored_digits",
                       "colored_digits_config.py")
DATA = os.environ.get("TEXTURED_DIGITS", "/tmp/textured_digits")  # make_textured_digits --out


def get_config(arg=None):
  return config_lib.import_config(COLORED).quickstart_on_npz(arg, DATA)


def get_sweep(arg=None):
  """ERM and DIV over `seeds` seeds, as configs/quickstart.py's sweep."""
  return config_lib.import_config(COLORED).get_sweep(arg)
