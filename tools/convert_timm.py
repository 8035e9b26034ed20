"""Exports a timm model's state_dict (ViT or ResNet) to the `.npz` vitreg_jax reads.

    /work/venv-torch/bin/python tools/convert_timm.py MODEL OUT.npz [--weights=FILE]

MODEL is a timm model name with its pretrained tag, e.g. `vit_tiny_patch16_224.augreg_in21k_ft_in1k`
or `resnet50.a1_in1k` (the ImageNet models the "How do ViTs work?" notebooks analyse);
`timm.create_model(MODEL, pretrained=True)` fetches the weights (Hugging Face hub, or its
cache), or `--weights=FILE` reads a state_dict saved by `torch.save` / `.safetensors`. OUT.npz
holds the state_dict's keys and arrays unchanged (float32); vitreg_jax translates them
(`models/weight_layouts.py`, `from_timm`, for ViTs; `models/timm_resnet.py` for ResNets),
without PyTorch. The model's `pretrained_cfg` (mean, std, crop) is printed: the data config
must normalize as it says (`configs/timm_imagenet.py` sets it for the two models above).

Runs in the separate PyTorch virtualenv (`bench/make_torch_venv.sh`); torch and timm are never
dependencies of vitreg_jax.
"""

import argparse
import json

import numpy as np
import timm
import torch


def state_dict_arrays(model: torch.nn.Module) -> dict:
  """`model.state_dict()` as NumPy arrays (floats as float32), keys unchanged."""
  return {k: (v.float() if v.is_floating_point() else v).detach().cpu().numpy()
          for k, v in model.state_dict().items()}


def export(model: torch.nn.Module, dst: str) -> dict:
  """Writes `model`'s state_dict to `dst` (.npz); returns the arrays."""
  arrays = state_dict_arrays(model)
  np.savez(dst, **arrays)
  return arrays


def load_model(name: str, weights=None) -> torch.nn.Module:
  """The timm model `name` with its pretrained weights, or those of the file `weights`."""
  model = timm.create_model(name, pretrained=weights is None)
  if weights is not None:
    if weights.endswith(".safetensors"):
      import safetensors.torch  # pylint: disable=g-import-not-at-top
      state = safetensors.torch.load_file(weights)
    else:
      state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
  return model.eval()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("model", help="timm model name (with tag)")
  parser.add_argument("out", help="OUT.npz")
  parser.add_argument("--weights", default=None, help="a state_dict file instead of the hub's")
  args = parser.parse_args(argv)
  model = load_model(args.model, args.weights)
  arrays = export(model, args.out)
  cfg = getattr(model, "pretrained_cfg", {}) or {}
  print(f"wrote {args.out}: {len(arrays)} arrays")
  print("pretrained_cfg: " + json.dumps({k: cfg.get(k) for k in (
      "input_size", "mean", "std", "crop_pct", "interpolation", "num_classes")}))


if __name__ == "__main__":
  main()
