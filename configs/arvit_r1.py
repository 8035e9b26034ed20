r"""ARViT-R1-1 on CIFAR-10: patch-similarity penalty on the first block (Table 1's best family).

A thin wrapper around configs/arvit.py with `variant=R1-1,dataset=cifar10` as defaults; every
argument of configs/arvit.py can be given and overrides them:

  python -m vitreg_jax.main --config=configs/arvit_r1.py --workdir=/tmp/arvit_r1
  python -m vitreg_jax.main --config=configs/arvit_r1.py:variant=R1-5,dataset=cifar100 \
      --workdir=/tmp/arvit_r1_5
  python -m vitreg_jax.main --config=configs/arvit_r1.py:runlocal --workdir=/tmp/arvit_r1_local

Without `init=` it trains from scratch on CIFAR-10; the paper fine-tunes from the rotation
pretraining (`configs/arvit.py:variant=R1-1,dataset=imagenet_rotation`), see configs/arvit.py.
"""

import os

from vitreg_jax import config_lib


def _arvit():
  return config_lib.import_config(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "arvit.py"))


def get_config(arg=None):
  """configs/arvit.py with `variant=R1-1,dataset=cifar10` unless `arg` says otherwise."""
  defaults = ["variant=R1-1", "dataset=cifar10"]
  return _arvit().get_config(",".join(defaults + ([arg] if arg else [])))
