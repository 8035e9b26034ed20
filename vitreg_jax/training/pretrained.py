"""Starting a run from pretrained weights: `config.init_from`.

`init_from = dict(path=..., kind=..., step=None, reset_head=None)`, kind one of `checkpoint`,
`npz`, `big_vision`, `timm`, `diverse_vit` (docs/finetuning.md):
`checkpoint` reads another vitreg_jax run (e.g. the ARViT rotation pretraining), `npz` a
public big_vision / AugReg ViT file (`models/convert.py`), `timm` a timm ViT or (into a
`resnet` model, BatchNorm statistics included) a timm ResNet (`models/timm_resnet.py`),
`diverse_vit` the head-diversity authors' checkpoints (`tools/convert_diverse_vit.py`). Only a
fresh run reads it: a run that resumes from its own checkpoint ignores `init_from`;
`python -m vitreg_jax.import_weights` writes it as a run of its own for the analyses.
"""

from typing import Any

from absl import logging
from etils import epath
import flax.traverse_util
import jax
from jax.experimental import multihost_utils
import numpy as np

from vitreg_jax import errors
from vitreg_jax.models import convert
from vitreg_jax.models import resnet
from vitreg_jax.models import timm_resnet
from vitreg_jax.training import run_files
from vitreg_jax.training import rundir


def _checkpoint_params(path: str, step: int | None) -> dict:
  """Params of another run (its workdir or its `checkpoints/` folder, any `etils.epath`
  path) as flat NumPy arrays (every process reads the whole tree)."""
  directory = epath.Path(path)
  if (directory / run_files.CHECKPOINT_DIR).is_dir():
    directory = directory / run_files.CHECKPOINT_DIR
  steps = run_files.step_dirs(directory)
  if not steps or (step is not None and step not in steps):
    raise errors.PathNotFoundError(
        f"config.init_from: no checkpoint {step or ''} under {directory} "
        f"(found steps {steps}).")
  item = directory / str(step if step is not None else steps[-1]) / "state"
  return convert.flatten(rundir.read_state(item)["params"])


# config.init_from.kind of public ViT weights -> the layout `convert.load_vit` insists on.
PUBLIC_WEIGHT_KINDS = {"npz": None, "big_vision": "big_vision", "timm": "timm",
                       "diverse_vit": "diverse_vit"}
# Public weight kinds a `resnet` model reads (timm's ResNets: `models/timm_resnet.py`).
RESNET_KINDS = ("npz", "timm")


def init_params_from(init_from, params, *, model, image_hw) -> Any:
  """Initializes `params` from a pretrained model (`config.init_from`), e.g. fine-tuning.

  `init_from = dict(path=..., kind='checkpoint' | 'npz' | 'big_vision' | 'timm', step=None,
  reset_head=None)`: `checkpoint` reads another vitreg_jax run (e.g. the ARViT rotation
  pretraining); the others read public ViT weights into a `vit` model (`models/convert.py`):
  `npz` detects the layout from the keys, `big_vision` (AugReg and big_vision `.npz`) and
  `timm` (a timm state_dict, `.safetensors` or `.npz`) insist on theirs. Every parameter is
  taken from the source; the head is
  re-initialized when its shape differs (new classes, or ARViT's flattened head at a new
  resolution) or when `reset_head=True`; a ViT's position embedding is resampled to the new
  patch grid. Anything else that does not fit is an error naming the parameters.
  """
  cfg = dict(init_from)
  unknown = sorted(set(cfg) - {"path", "kind", "step", "reset_head"})
  if unknown or "path" not in cfg:
    raise errors.UserError(f"config.init_from needs `path` and accepts kind, step, reset_head; got "
                           f"unknown {unknown}.")
  kind, reset_head = cfg.get("kind", "checkpoint"), cfg.get("reset_head")
  if kind in PUBLIC_WEIGHT_KINDS:
    if not epath.Path(cfg["path"]).is_file():
      raise errors.PathNotFoundError(f"config.init_from.path {cfg['path']!r} is not a file (kind "
                                     f"{kind!r} reads a .npz or .safetensors file).")
    loaded = convert.load_vit(cfg["path"], params, model=model, image_hw=image_hw,
                              reset_head=reset_head, layout=PUBLIC_WEIGHT_KINDS[kind])
    logging.info("Initialized %d parameter arrays from %s (kind=%r).",
                 len(jax.tree.leaves(loaded)), cfg["path"], kind)
    return loaded
  if kind != "checkpoint":
    raise errors.UserError(f"config.init_from.kind must be one of "
                           f"{['checkpoint', *PUBLIC_WEIGHT_KINDS]}, got {kind!r}.")
  source = _checkpoint_params(cfg["path"], cfg.get("step"))
  target = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  merged, problems = {}, []
  for key, fresh in target.items():
    have = source.get(key)
    if key.startswith("head/") and (reset_head or have is None or have.shape != fresh.shape):
      merged[key] = fresh
    elif have is None:
      problems.append(f"{key}: missing in the source")
    elif (have.shape != fresh.shape and key == convert.POSEMB_KEY
          and have.shape[-1] == fresh.shape[-1]):  # Same width, another patch grid.
      gh, gw, prefix = model.token_layout(image_hw)
      merged[key] = convert.resample_posemb(have, (gh, gw), prefix)
    elif have.shape != fresh.shape:
      problems.append(f"{key}: source {have.shape} vs model {fresh.shape}")
    else:
      merged[key] = have
  if problems:
    raise errors.UserError(
        f"config.init_from {cfg['path']} does not fit the model:\n  "
        + "\n  ".join(problems[:20])
        + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))
  logging.info("Initialized %d parameter arrays from %s.", len(merged), cfg["path"])
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})


def _init_resnet_from(init_from, state, shardings):
  """`state` with the params and BatchNorm statistics of a timm ResNet file."""
  path = init_from["path"]
  if not epath.Path(path).is_file():
    raise errors.PathNotFoundError(f"config.init_from.path {path!r} is not a file (a timm "
                                   "ResNet's state_dict as .npz or .safetensors).")
  variables = host_copy({"params": state.params, **state.model_state})
  params, stats = timm_resnet.load_resnet(path, variables, reset_head=init_from.get("reset_head"))
  logging.info("Initialized the resnet and its BatchNorm statistics from %s.", path)
  return state.replace(
      params=jax.tree.map(place, params, shardings.params),
      model_state={"batch_stats": jax.tree.map(place, stats,
                                               shardings.model_state["batch_stats"])})


def init_state_from(init_from, state, shardings, *, tx, model, image_hw):
  """`state` with its params from `init_from` and a fresh optimizer state for them (with a
  timm ResNet file, the BatchNorm statistics too).

  Works when the params are split across processes (`sharding.fsdp` on several hosts): the
  fresh params are gathered to every host (`process_allgather`, not `device_get`, which
  cannot read other processes' shards), merged with the source on the host, and each
  process then places only its own shards (`make_array_from_callback`).
  """
  if isinstance(model, resnet.ResNet) and dict(init_from).get("kind") in RESNET_KINDS:
    state = _init_resnet_from(dict(init_from), state, shardings)
    params = state.params
  else:
    params = init_params_from(init_from, host_copy(state.params), model=model,
                              image_hw=image_hw)
    params = jax.tree.map(place, params, shardings.params)
  return state.replace(params=params, opt_state=jax.jit(
      tx.init, out_shardings=shardings.opt_state)(params))


def host_copy(tree):
  """A full NumPy copy of a pytree of (possibly multi-process) arrays on every process."""
  if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def place(value, sharding) -> jax.Array:
  """A global array with `sharding` from a host value that every process holds whole."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
