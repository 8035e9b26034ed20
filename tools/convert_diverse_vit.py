"""Converts the head-diversity authors' PyTorch checkpoints to the `.npz` vitreg_jax reads.

    /work/venv-torch/bin/python tools/convert_diverse_vit.py IN.pth OUT.npz

IN.pth is one of the checkpoints ArmandNM/diverse-vit releases (`checkpoints/ckpt_erm_ep37.pth`,
`checkpoints/ckpt_diverse_ep34.pth`) or any `.pth` their training writes: `torch.save` of
`model.state_dict()` where `model` is their `Recorder` around a `DiverseViT`
(diverse_vit/logging.py, `log_state_dict`; diverse_vit/utils.py, `get_model`), so every key
starts with `vit.`. OUT.npz holds the same keys and arrays, unchanged (float32): the
translation to vitreg_jax's ViT names is the package's (`vitreg_jax/models/weight_layouts.py`,
`from_diverse_vit`), which runs without PyTorch and is tested on a fixture this script wrote
(`tests/fixtures/make_import_fixtures.py`). Load OUT.npz with
`configs/mnist_cifar.py:init=OUT.npz` (their architecture, their [0, 1] inputs) through
`python -m vitreg_jax.import_weights` or as a training run's `init_from`.

Runs in the separate PyTorch virtualenv (`bench/make_torch_venv.sh`); torch is never a
dependency of vitreg_jax.
"""

import sys

import numpy as np
import torch


def state_dict_arrays(path: str) -> dict:
  """The checkpoint's tensors as float32 / integer NumPy arrays, keys unchanged.

  Accepts a bare state_dict or a dict holding one under 'state_dict' / 'model'."""
  state = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model"):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  if not any(k.removeprefix("vit.").startswith("transformer.layers.") for k in state):
    raise SystemExit(f"{path}: no `transformer.layers.` keys; not a DiverseViT state_dict "
                     f"(keys like {sorted(state)[:4]}).")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def convert(src: str, dst: str) -> dict:
  """Writes the arrays of `src` to `dst` (.npz); returns them."""
  arrays = state_dict_arrays(src)
  np.savez(dst, **arrays)
  return arrays


def main(argv):
  if len(argv) != 3 or not argv[2].endswith(".npz"):
    raise SystemExit("usage: python tools/convert_diverse_vit.py IN.pth OUT.npz")
  arrays = convert(argv[1], argv[2])
  depth = len({k.split(".")[3] for k in arrays if k.startswith("vit.transformer.layers.")})
  print(f"wrote {argv[2]}: {len(arrays)} arrays, {depth} layers, "
        f"{sum(a.size for a in arrays.values())} numbers")


if __name__ == "__main__":
  main(sys.argv)
