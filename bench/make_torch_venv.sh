#!/usr/bin/env bash
# A separate virtualenv with PyTorch (CPU) and timm, for the timm comparison in
# bench/train_step.py and for regenerating test fixtures. Never a dependency of vitreg_jax.
#
#   bench/make_torch_venv.sh [VENV_DIR]      (default /work/venv-torch)
#
# There is no CPU build of torchvision on PyPI, and timm imports a few torchvision names at
# module level (FrozenBatchNorm2d, transforms) that its ViT never uses. Where torchvision is
# missing, this script installs a tiny stand-in package exposing those names, so `import timm`
# works; any real use of torchvision through it raises. On a machine with a real torchvision
# (the lent GPU machine), nothing is stubbed.
set -euo pipefail
venv=${1:-/work/venv-torch}
python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==2.13.0" numpy pillow safetensors pyyaml huggingface_hub
"$venv/bin/pip" install -q --no-deps timm
if ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  site=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
  mkdir -p "$site/torchvision"
  cat > "$site/torchvision/__init__.py" <<'PY'
"""Stand-in for torchvision (no CPU build on PyPI): only the names timm imports at load time."""
import sys
import types

import torch


class _Unavailable:
  def __init__(self, *args, **kwargs):
    raise RuntimeError("torchvision is a stand-in in this virtualenv (bench/make_torch_venv.sh)")


class FrozenBatchNorm2d(torch.nn.Module):  # Only used by timm for isinstance checks.
  pass


def _missing(attr):
  if attr.startswith("__"):
    raise AttributeError(attr)
  return _Unavailable


def _module(name, **attrs):
  mod = types.ModuleType(name)
  mod.__dict__.update(attrs)
  mod.__getattr__ = _missing
  sys.modules[name] = mod
  return mod


class InterpolationMode:
  NEAREST, BILINEAR, BICUBIC, BOX, HAMMING, LANCZOS = (
      "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


ops = _module("torchvision.ops")
ops.misc = _module("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
transforms = _module("torchvision.transforms", InterpolationMode=InterpolationMode)
transforms.functional = _module("torchvision.transforms.functional",
                                InterpolationMode=InterpolationMode)
datasets = _module("torchvision.datasets")
models = _module("torchvision.models")
models.feature_extraction = _module("torchvision.models.feature_extraction")
PY
fi
"$venv/bin/python" -c "import timm, torch; print('timm', timm.__version__, 'torch', torch.__version__)"
