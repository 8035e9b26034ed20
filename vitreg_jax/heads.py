r"""Head selection and per-head diagnostics (head-diversity poster, "Head selection").

The poster ("Learning Diverse Features in Vision Transformers for Improved Generalization")
masks a subset of a layer's attention heads (their outputs set to 0), rescales the output to
compensate, and shows that keeping only the heads that carry the robust feature ("oracle
selection") raises OOD accuracy. This module measures that on a trained run and chooses heads:

* **Per-head evaluation** (`evaluate_masks`): every head alone (the other heads of its layer
  masked, the layer rescaled by `heads / kept`, as the models do) and every head removed,
  scored on the label (`accuracy`) and on the spurious attribute (`spurious_accuracy`, how
  often the prediction equals it) on every eval split. Many masks run in ONE compiled
  function: the batch is tiled over a chunk of masks and each copy gets its own per-example
  `[depth, heads]` mask (`MaskEvaluator`), so scoring all heads of a layer costs about
  `(1 + 2 H)` evaluations and one compilation.
* **Selection rules** (`RULES`; validation splits only, test figures are reported, never used):
  `oracle` (the authors': the single head with the best OOD validation accuracy), `greedy`
  (flip one head at a time while OOD validation accuracy improves), `topk` (the k best heads
  by a per-head score) and `id_conflict`, which needs no OOD data: on the ID validation
  examples where the spurious attribute disagrees with the label, keep the heads that follow
  the label more often than the attribute.
* **Per-eval head figures during training** (`config.head_eval`, `TrainingHeadEval`): every
  evaluation appends each head's figures to `WORKDIR/heads_eval.jsonl`, so the authors' choice
  of epoch and head (`evaluate_epoch_head_combinations` in their code) needs no checkpoints
  (`epoch_oracle`).
* **The poster's table across runs** (`poster_table`).

Command::

  python -m vitreg_jax.heads --workdir=DIR [--layer=-1|all|0,3] \
      [--select=oracle|greedy|topk|id_conflict] [--k=2] [--out=DIR]
  python -m vitreg_jax.heads --table W1 W2 ... [--out=DIR]

writes `heads.json`, `heads.md`, `heads.png` and the selected mask `head_mask.json` (usable as
`config.head_mask=DIR/head_mask.json`); `--table` writes `table.md`. See docs/heads.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable, Iterable, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax import poster as poster_lib

RULES = ("oracle", "greedy", "topk", "id_conflict")
TOPK_SCORES = ("ood", "id_conflict")
MASK_FILE = "head_mask.json"
HEAD_EVAL_FILE = "heads_eval.jsonl"

# --------------------------------------------------------------------------------------
# Masks.
# --------------------------------------------------------------------------------------


def parse_layers(layer, depth: int) -> tuple[int, ...]:
  """`-1` / `3` / `'all'` / `'0,3'` -> sorted 0-based block indices (negative from the end).

  Raises:
    ValueError: naming the valid range, for an index outside the model.
  """
  if isinstance(layer, str):
    text = layer.strip().lower()
    if text in ("all", "*"):
      return tuple(range(depth))
    if text in ("last", ""):
      layer = -1
    else:
      try:
        layer = [int(p) for p in text.split(",") if p.strip()]
      except ValueError:
        raise ValueError(f"Layer {layer!r}: use an integer (-1 = last), 'all' or a list "
                         "like '0,3'.") from None
  items = [layer] if isinstance(layer, (int, np.integer)) else list(layer)
  out = []
  for i in items:
    if not -depth <= int(i) < depth:
      raise ValueError(f"Layer {i} is outside the model's {depth} blocks (valid: "
                       f"{-depth}..{depth - 1}, or 'all').")
    out.append(int(i) % depth)
  return tuple(sorted(set(out)))


def head_masks(depth: int, num_heads: int, layers: Sequence[int], kind: str):
  """Single-head masks: `kind='alone'` keeps only head h of layer l, `'removed'` drops it.

  Returns:
    `(masks float32 [len(layers) * H, depth, H], [(layer, head), ...])`; every other layer
    keeps all its heads.
  """
  if kind not in ("alone", "removed"):
    raise ValueError(f"kind must be 'alone' or 'removed', got {kind!r}.")
  masks, index = [], []
  for layer in layers:
    for head in range(num_heads):
      m = np.ones((depth, num_heads), np.float32)
      if kind == "alone":
        m[layer] = 0.0
      m[layer, head] = 1.0 if kind == "alone" else 0.0
      masks.append(m)
      index.append((layer, head))
  return np.stack(masks), index


def model_shape(model) -> tuple[int, int]:
  """`(depth, num_heads)` of an attention model; a clear error for other models."""
  depth, heads = getattr(model, "depth", None), getattr(model, "num_heads", None)
  if not (isinstance(depth, int) and isinstance(heads, int)):
    raise ValueError(f"Head masks need an attention model with `depth` and `num_heads`; "
                     f"{type(model).__name__} has none (use a ViT-like model).")
  return depth, heads


def load_head_mask(value, shape: tuple[int, int] | None = None) -> np.ndarray:
  """A `[depth, heads]` mask from an array/list or from a file or workdir.

  Args:
    value: an array or nested list; a path to a `.json` file holding a `mask` entry (the
      `head_mask.json` or `heads.json` this module writes) or to a `.npy` file; or a run
      directory holding `head_mask.json`.
    shape: the expected `(depth, heads)`; None skips the check.
  Raises:
    FileNotFoundError / ValueError: naming the file or the expected shape.
  """
  if isinstance(value, (str, os.PathLike)):
    path = epath.Path(value)  # Local or remote (gs://...).
    if path.is_dir():
      path = path / MASK_FILE
    if not path.exists():
      raise FileNotFoundError(f"Head mask file {path} not found; write one with "
                              "`python -m vitreg_jax.heads --workdir=RUN`.")
    if path.name.endswith(".npy"):
      with path.open("rb") as f:
        value = np.load(f)
    else:
      loaded = json.loads(path.read_text())
      value = loaded["mask"] if isinstance(loaded, dict) else loaded
  mask = np.asarray(value, np.float32)
  if shape is not None and mask.shape != tuple(shape):
    raise ValueError(f"Head mask has shape {mask.shape}; the model expects [depth, heads] = "
                     f"{tuple(shape)}. Use a mask selected on a run of the same model.")
  if mask.ndim == 2 and (mask.sum(axis=1) <= 0).any():
    raise ValueError(f"Head mask masks every head of layer(s) "
                     f"{np.flatnonzero(mask.sum(axis=1) <= 0).tolist()}: keep >= 1 per layer.")
  return mask


def save_head_mask(mask, directory: str, **info) -> str:
  """Writes `directory/head_mask.json` (`mask` plus `info`, e.g. the rule); returns the path."""
  path = str(epath.Path(directory) / MASK_FILE)
  _write(path, json.dumps({"mask": np.asarray(mask).tolist(), **info}, indent=1))
  return path


def _write(path, text: str) -> None:
  from vitreg_jax import rundir  # pylint: disable=g-import-not-at-top
  rundir.write_text(path, text)


# --------------------------------------------------------------------------------------
# Many masks in one compiled pass.
# --------------------------------------------------------------------------------------


class MaskEvaluator:
  """Predictions of one model under many head masks, with one compilation per batch shape.

  The batch `[B, ...]` is tiled over a chunk of `C` masks into `[C * B, ...]` and example
  `c * B + b` gets mask `c` (the models take per-example `[B, depth, heads]` masks), so one
  call scores C masks. Masks are padded to a multiple of C (with all-ones masks, discarded)
  so every call has the same shapes: `traces` counts compilations.
  """

  def __init__(self, model, *, masks_per_pass: int | None = None,
               examples_per_pass: int = 8192):
    self.model = model
    self.depth, self.num_heads = model_shape(model)
    self.masks_per_pass = masks_per_pass
    self.examples_per_pass = examples_per_pass
    self.traces = 0
    self._fn = jax.jit(self._predict, static_argnums=4)

  def _predict(self, variables, images, labels, masks, normalize):
    from vitreg_jax import steps  # pylint: disable=g-import-not-at-top
    self.traces += 1  # Runs only while tracing: counts compilations.
    images = steps.model_images(images, normalize)  # uint8 batches: normalized here.
    c, b = masks.shape[0], images.shape[0]
    tiled = jnp.tile(images, (c,) + (1,) * (images.ndim - 1))  # Mask-major: [c * b, ...].
    per_example = jnp.repeat(masks, b, axis=0)
    logits, _ = self.model.apply(variables, tiled, head_mask=per_example, train=False)
    logits = logits.astype(jnp.float32).reshape(c, b, -1)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(labels, (c, b)))
    return jnp.argmax(logits, -1), loss

  def chunk_size(self, batch_size: int, num_masks: int) -> int:
    """Masks per call: `masks_per_pass` when set (fixed shapes), else what fits."""
    if self.masks_per_pass:
      return self.masks_per_pass
    return max(1, min(self.examples_per_pass // max(batch_size, 1), num_masks))

  def num_chunks(self, batch_size: int, num_masks: int) -> int:
    return math.ceil(num_masks / self.chunk_size(batch_size, num_masks))

  def __call__(self, variables, images, labels, masks, chunk: int | None = None,
               normalize=None):
    """Returns `(pred int [M, B], loss float [M, B])` for masks `[M, depth, heads]`.

    `normalize` (`data.normalization(...)`) maps uint8 images to the model's input on the
    device; float images are used as given."""
    masks = np.asarray(masks, np.float32)
    m = masks.shape[0]
    chunk = chunk or self.chunk_size(images.shape[0], m)
    padded = math.ceil(m / chunk) * chunk
    masks = np.concatenate([masks, np.ones((padded - m,) + masks.shape[1:], np.float32)])
    preds, losses = [], []
    for start in range(0, padded, chunk):
      p, l = self._fn(variables, images, labels, masks[start:start + chunk], normalize)
      preds.append(np.asarray(p))
      losses.append(np.asarray(l))
    return np.concatenate(preds)[:m], np.concatenate(losses)[:m]


def spurious_key(attributes: Iterable[str]) -> str | None:
  """The batch attribute the spurious accuracy is scored on (`spurious`, else `place`)."""
  attributes = tuple(attributes)
  for key in ("spurious", "place"):
    if key in attributes:
      return key
  return None


def mask_metrics(pred, loss, arrays: dict, spurious: str | None) -> dict[str, float]:
  """Accuracy, loss, spurious accuracy and, where known, group and conflict accuracies.

  `conflict_accuracy` / `conflict_spurious_accuracy`: accuracy on the examples whose spurious
  attribute differs from the label, and how often the prediction follows the attribute there.
  """
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  real = arrays["mask"] > 0
  pred, loss, label = pred[real], loss[real], arrays["label"][real]
  out = {"accuracy": float(np.mean(pred == label)), "loss": float(np.mean(loss)),
         "num_examples": int(real.sum())}
  if spurious is not None and spurious in arrays:
    attr = arrays[spurious][real]
    out["spurious_accuracy"] = float(np.mean(pred == attr))
    conflict = attr != label
    if conflict.any():
      out["conflict_accuracy"] = float(np.mean(pred[conflict] == label[conflict]))
      out["conflict_spurious_accuracy"] = float(np.mean(pred[conflict] == attr[conflict]))
  if "group" in arrays:
    group = arrays["group"][real]
    stats = data.group_metrics(pred, label, group, num_groups=int(group.max()) + 1)
    out["worst_group_accuracy"] = stats["worst_group_accuracy"]
    out["mean_group_accuracy"] = stats["mean_group_accuracy"]
  return out


def evaluate_masks(evaluator: MaskEvaluator, variables, data_config, split: str, masks, *,
                   batch_size: int, spurious: str | None, progress=None) -> list[dict]:
  """Metrics of every mask `[M, depth, heads]` on `split` (one dict per mask)."""
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  masks = np.asarray(masks, np.float32)
  preds, losses, arrays = [], [], {}
  normalize = data.normalization(data_config)
  for batch in data.make_eval_iterator(data_config, split, global_batch_size=batch_size):
    p, l = evaluator(variables, batch["image"], batch["label"], masks, normalize=normalize)
    preds.append(p)
    losses.append(l)
    for k, v in batch.items():
      if k != "image":
        arrays.setdefault(k, []).append(np.asarray(v))
    if progress is not None:
      progress.update(evaluator.num_chunks(len(batch["label"]), len(masks)))
  if not preds:
    raise ValueError(f"Eval split {split!r} is empty.")
  pred, loss = np.concatenate(preds, axis=1), np.concatenate(losses, axis=1)
  arrays = {k: np.concatenate(v) for k, v in arrays.items()}
  return [mask_metrics(pred[i], loss[i], arrays, spurious) for i in range(len(masks))]


# --------------------------------------------------------------------------------------
# Which split plays which role.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Roles:
  """Which split and metric are ID / OOD, for validation (selection) and test (reporting)."""
  val_id: str
  val_ood: str
  test_id: str
  test_ood: str
  id_metric: str = "accuracy"
  ood_metric: str = "accuracy"


def split_roles(splits: Sequence[str], attributes: Sequence[str] = ()) -> Roles:
  """Roles from the split names: `{val,test}_{id,ood}` (dominoes, MNIST-CIFAR), or
  `val` / `test` with groups (Waterbirds: OOD = the mean of the group accuracies, i.e. the
  accuracy on a group-balanced set, our reading; the poster does not define its metric).

  Raises:
    ValueError: naming the splits, when neither layout fits.
  """
  splits = tuple(splits)
  if all(s in splits for s in ("val_id", "val_ood", "test_id", "test_ood")):
    return Roles("val_id", "val_ood", "test_id", "test_ood")
  if "val" in splits and "test" in splits and "group" in attributes:
    return Roles("val", "val", "test", "test", ood_metric="mean_group_accuracy")
  if "val_id" in splits and "val_ood" in splits:  # No test splits: report validation.
    return Roles("val_id", "val_ood", "val_id", "val_ood")
  raise ValueError(f"Cannot tell the ID and OOD validation splits apart in {list(splits)}: "
                   "head selection needs val_id/val_ood(/test_id/test_ood) splits, or "
                   "val/test with a `group` attribute.")


# --------------------------------------------------------------------------------------
# Selection rules (validation splits only).
# --------------------------------------------------------------------------------------


def greedy_search(score_fn: Callable[[np.ndarray], np.ndarray], start, layers: Sequence[int],
                  *, min_gain: float = 0.0) -> tuple[np.ndarray, float, list]:
  """Hill climbing over head subsets: flip (add or remove) one head of `layers` at a time.

  Each round scores every mask that differs from the current one by one head of `layers`
  (never masking a whole layer) in a single `score_fn` call and moves to the best one while
  it improves the score by more than `min_gain`; it stops at a local optimum.

  Args:
    score_fn: masks `[M, depth, heads]` -> scores `[M]` (e.g. OOD validation accuracy).
    start: the first mask `[depth, heads]`.
    layers: the layers whose heads may change.
  Returns:
    `(mask, score, path)`; `path` lists `(mask, score)` after each accepted move.
  """
  mask = np.asarray(start, np.float32).copy()
  best = float(score_fn(mask[None])[0])
  path = [(mask.copy(), best)]
  while True:
    candidates = []
    for layer in layers:
      for head in range(mask.shape[1]):
        m = mask.copy()
        m[layer, head] = 1.0 - m[layer, head]
        if m[layer].sum() > 0:
          candidates.append(m)
    if not candidates:
      break
    scores = np.asarray(score_fn(np.stack(candidates)), np.float64)
    i = int(np.argmax(scores))
    if scores[i] <= best + min_gain:
      break
    mask, best = candidates[i], float(scores[i])
    path.append((mask.copy(), best))
  return mask, best, path


def _score(metrics: dict, key: str) -> float:
  value = metrics.get(key)
  return float("nan") if value is None else float(value)


def select_oracle(heads: list[dict], roles: Roles, full_mask) -> tuple[np.ndarray, dict]:
  """The authors' oracle: the single head (alone) with the best OOD validation score."""
  scores = [_score(h["alone"][roles.val_ood], roles.ood_metric) for h in heads]
  best = heads[int(np.nanargmax(scores))]
  mask = np.array(full_mask, np.float32)
  mask[best["layer"]] = 0.0
  mask[best["layer"], best["head"]] = 1.0
  return mask, {"layer": best["layer"], "head": best["head"], "score": float(np.nanmax(scores))}


def select_topk(heads: list[dict], roles: Roles, full_mask, *, k: int | None = None,
                score: str = "ood") -> tuple[np.ndarray, dict]:
  """Keeps, in each evaluated layer, the `k` heads with the best per-head score.

  `score='ood'`: head-alone OOD validation accuracy; `'id_conflict'`: head-alone accuracy on
  the ID validation examples whose spurious attribute disagrees with the label (no OOD data).
  `k` defaults to half the heads (rounded up).
  """
  if score not in TOPK_SCORES:
    raise ValueError(f"topk score must be one of {TOPK_SCORES}, got {score!r}.")
  mask = np.array(full_mask, np.float32)
  k = k or math.ceil(mask.shape[1] / 2)
  if not 1 <= k <= mask.shape[1]:
    raise ValueError(f"--k must be in 1..{mask.shape[1]} (the heads per layer), got {k}.")
  kept = {}
  for layer in sorted({h["layer"] for h in heads}):
    rows = [h for h in heads if h["layer"] == layer]
    values = [_score(h["alone"][roles.val_ood], roles.ood_metric) if score == "ood"
              else _score(h["alone"][roles.val_id], "conflict_accuracy") for h in rows]
    order = np.argsort(-np.nan_to_num(np.asarray(values), nan=-np.inf), kind="stable")[:k]
    mask[layer] = 0.0
    mask[layer, [rows[i]["head"] for i in order]] = 1.0
    kept[layer] = sorted(rows[i]["head"] for i in order)
  return mask, {"k": k, "score": score, "kept": kept}


def select_id_conflict(heads: list[dict], roles: Roles, full_mask) -> tuple[np.ndarray, dict]:
  """A rule without OOD data: drop the heads that follow the spurious attribute.

  On the ID validation examples where the spurious attribute disagrees with the label, keep
  each head (alone) that predicts the label more often than the attribute; a layer where no
  head does keeps its single best head. Needs the attribute on ID data, no OOD split.
  """
  mask = np.array(full_mask, np.float32)
  kept = {}
  for layer in sorted({h["layer"] for h in heads}):
    rows = [h for h in heads if h["layer"] == layer]
    stats = [h["alone"][roles.val_id] for h in rows]
    if any("conflict_accuracy" not in s for s in stats):
      raise ValueError(f"Rule id_conflict needs a spurious attribute and conflicting examples "
                       f"on {roles.val_id!r}; this dataset has none. Use another --select.")
    good = [r["head"] for r, s in zip(rows, stats)
            if s["conflict_accuracy"] > s["conflict_spurious_accuracy"]]
    if not good:
      good = [rows[int(np.argmax([s["conflict_accuracy"] for s in stats]))]["head"]]
    mask[layer] = 0.0
    mask[layer, good] = 1.0
    kept[layer] = good
  return mask, {"kept": kept}


# --------------------------------------------------------------------------------------
# The analysis of one run.
# --------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, desc=desc, unit="pass", file=sys.stderr)


def eval_splits_of(config, info) -> tuple[str, ...]:
  """Every split but the training one: ID and OOD, validation and test."""
  train_split = config.data.get("train_split", "train")
  return tuple(s for s in info.splits if s != train_split)


class _RunEval:
  """Scores masks on a run's splits; holds the compiled evaluator and the data config."""

  def __init__(self, model, variables, config, info, splits, *, progress: bool = False):
    from vitreg_jax import data  # pylint: disable=g-import-not-at-top
    self.evaluator = MaskEvaluator(model)
    self.variables = jax.device_put(variables)
    self.config, self.splits, self.show = config, tuple(splits), progress
    self.batch_size = int(config.get("eval_batch_size") or config.batch_size)
    self.spurious = spurious_key(info.attributes)
    self.batches = {s: math.ceil(data.num_examples(config.data, s) / self.batch_size)
                    for s in self.splits}

  def __call__(self, masks, splits=None, desc="masks") -> dict[str, list[dict]]:
    splits = tuple(splits or self.splits)
    if not self.evaluator.masks_per_pass:  # The first call fixes the shapes: one compilation.
      self.evaluator.masks_per_pass = self.evaluator.chunk_size(self.batch_size, len(masks))
    per_batch = self.evaluator.num_chunks(self.batch_size, len(masks))
    bar = _progress(sum(self.batches[s] for s in splits) * per_batch, desc, self.show)
    try:
      return {s: evaluate_masks(self.evaluator, self.variables, self.config.data, s, masks,
                                batch_size=self.batch_size, spurious=self.spurious,
                                progress=bar) for s in splits}
    finally:
      if bar is not None:
        bar.close()


def _select(rule: str, heads, roles, full_mask, layers, run_eval, *, k=None,
            topk_score="ood"):
  if rule == "oracle":
    return select_oracle(heads, roles, full_mask)
  if rule == "topk":
    return select_topk(heads, roles, full_mask, k=k, score=topk_score)
  if rule == "id_conflict":
    return select_id_conflict(heads, roles, full_mask)
  if rule == "greedy":
    def score_fn(masks):
      results = run_eval(masks, [roles.val_ood], desc="greedy")[roles.val_ood]
      return np.array([_score(r, roles.ood_metric) for r in results])
    # Start from the best of the full model and every head alone (so greedy >= oracle).
    oracle_mask, _ = select_oracle(heads, roles, full_mask)
    start = max([full_mask, oracle_mask], key=lambda m: score_fn(m[None])[0])
    mask, score, path = greedy_search(score_fn, start, layers)
    return mask, {"score": score, "path": [dict(mask=m.tolist(), score=s) for m, s in path]}
  raise ValueError(f"Unknown selection rule {rule!r}; valid rules: {list(RULES)}.")


def analyze(workdir: str, *, layer="-1", rule: str = "oracle", k: int | None = None,
            topk_score: str = "ood", step: int | None = None, progress: bool = True) -> dict:
  """Per-head evaluation of a run's checkpoint and a head selection (the `heads.json` dict).

  Args:
    workdir: a training run's workdir (`config.json` + checkpoints).
    layer: the layer(s) whose heads are evaluated and selected: -1 (last), 'all', '0,3'.
    rule: one of `RULES`; `k`, `topk_score` for `topk`.
    step: the checkpoint (default: newest).
  Returns:
    dict with `heads` (per head: `layer`, `head`, per split head-alone `accuracy` and
    `spurious_accuracy`, and the full metrics `alone` / `removed`), `full` and `selected`
    (per split metrics), `mask`, `rule`, `selection`, `roles`, and `epoch_oracle` when the run
    logged per-eval head figures (`config.head_eval`).
  """
  from vitreg_jax import rundir  # pylint: disable=g-import-not-at-top
  if rule not in RULES:
    raise ValueError(f"Unknown selection rule {rule!r}; valid rules: {list(RULES)}.")
  run = rundir.load_run(workdir, step)
  info = run.info
  depth, num_heads = model_shape(run.model)
  layers = parse_layers(layer, depth)
  splits = eval_splits_of(run.config, info)
  roles = split_roles(splits, info.attributes)
  run_eval = _RunEval(run.model, run.variables, run.config, info, splits, progress=progress)
  full_mask = np.ones((depth, num_heads), np.float32)
  alone, index = head_masks(depth, num_heads, layers, "alone")
  removed, _ = head_masks(depth, num_heads, layers, "removed")
  results = run_eval(np.concatenate([full_mask[None], alone, removed]), desc="heads")
  n = len(index)
  heads = [{"layer": l, "head": h,
            "accuracy": {s: results[s][1 + i]["accuracy"] for s in splits},
            "spurious_accuracy": {s: results[s][1 + i].get("spurious_accuracy")
                                  for s in splits},
            "alone": {s: results[s][1 + i] for s in splits},
            "removed": {s: results[s][1 + n + i] for s in splits}}
           for i, (l, h) in enumerate(index)]
  mask, selection = _select(rule, heads, roles, full_mask, layers, run_eval, k=k,
                            topk_score=topk_score)
  selected = run_eval(mask[None], desc="selected")
  result = {
      "workdir": workdir if "://" in str(workdir) else os.path.abspath(workdir), "step": run.step, "dataset": run.config.data.name,
      "layers": list(layers), "rule": rule, "selection": selection,
      "roles": dataclasses.asdict(roles), "splits": list(splits),
      "full": {s: results[s][0] for s in splits},
      "selected": {s: selected[s][0] for s in splits},
      "mask": mask.tolist(), "heads": heads,
      "compilations": run_eval.evaluator.traces,
  }
  records = read_head_eval(workdir)
  if records:
    result["epoch_oracle"] = epoch_oracle(records, roles)
  return result


# --------------------------------------------------------------------------------------
# Per-eval head figures during training (`config.head_eval`) and the epoch oracle.
# --------------------------------------------------------------------------------------


class TrainingHeadEval:
  """Appends every head's figures, at each evaluation, to `WORKDIR/heads_eval.jsonl`.

  One line per (step, split, mask): `{"step", "split", "kind": "full"|"alone", "layer",
  "head", "accuracy", "spurious_accuracy", ...}` for the full model and each head alone of
  the layers `config.head_eval` names, on every split but the training one.
  """

  def __init__(self, config, model, info, workdir: str, start_step: int = 0):
    from vitreg_jax import reporting  # pylint: disable=g-import-not-at-top
    depth, num_heads = model_shape(model)
    self.layers = parse_layers(config.head_eval, depth)
    alone, self.index = head_masks(depth, num_heads, self.layers, "alone")
    self.masks = np.concatenate([np.ones((1, depth, num_heads), np.float32), alone])
    self.run_eval = _RunEval(model, None, config, info, eval_splits_of(config, info))
    # Lines past `start_step` (written after the checkpoint a resumed run restarts from) go.
    self.out = reporting.JsonlWriter(workdir, start_step, name=HEAD_EVAL_FILE)

  def __call__(self, step: int, state) -> None:
    """Evaluates the train state's (`params`, `model_state`) masks and appends the lines."""
    self.run_eval.variables = {"params": state.params, **state.model_state}
    results = self.run_eval(self.masks)
    keys = [("full", None, None)] + [("alone", l, h) for l, h in self.index]
    self.out.write_records([{"step": int(step), "split": split, "kind": kind, "layer": layer,
                             "head": head, **m}
                            for split, metrics in results.items()
                            for (kind, layer, head), m in zip(keys, metrics)])


def training_hook(config, model, info, workdir: str,
                  start_step: int = 0) -> TrainingHeadEval | None:
  """The training loop's per-eval head evaluation, or None when `config.head_eval` is off.

  `config.head_eval`: '' / None (off), or the layers to evaluate: '-1' (last), 'all', '0,3'.
  Raises ValueError before training for a bad layer, a model without heads or several
  processes (the evaluation gathers nothing across hosts).
  """
  if config.get("head_eval") in (None, "", False):
    return None
  if jax.process_count() > 1:
    raise ValueError("config.head_eval runs in single-process training only; evaluate the "
                     "checkpoints with `python -m vitreg_jax.heads` instead.")
  return TrainingHeadEval(config, model, info, workdir, start_step)


def read_head_eval(workdir: str) -> list[dict]:
  """The lines of `WORKDIR/heads_eval.jsonl` (empty if the run did not log them); a line
  repeated by a resumed run replaces the earlier one."""
  path = epath.Path(workdir) / HEAD_EVAL_FILE
  if not path.exists():
    return []
  latest = {}
  with path.open() as f:
    for line in f:
      r = json.loads(line)
      latest[(r["step"], r["split"], r["kind"], r["layer"], r["head"])] = r
  return list(latest.values())


def epoch_oracle(records: list[dict], roles: Roles) -> dict:
  """The authors' choice: the (step, head alone) with the best OOD validation score.

  Returns:
    `{"step", "layer", "head", "score", "metrics": {split: ...}, "full": {split: ...}}`, the
    chosen head's and the full model's metrics at that step on every logged split.
  """
  alone = [r for r in records if r["kind"] == "alone" and r["split"] == roles.val_ood]
  if not alone:
    raise ValueError(f"No head-alone figures on {roles.val_ood!r} in {HEAD_EVAL_FILE}.")
  best = max(alone, key=lambda r: (_score(r, roles.ood_metric), -r["step"]))
  strip = lambda r: {k: v for k, v in r.items()
                     if k not in ("step", "split", "kind", "layer", "head")}
  at_step = [r for r in records if r["step"] == best["step"]]
  return {"step": best["step"], "layer": best["layer"], "head": best["head"],
          "score": _score(best, roles.ood_metric),
          "metrics": {r["split"]: strip(r) for r in at_step if r["kind"] == "alone"
                      and (r["layer"], r["head"]) == (best["layer"], best["head"])},
          "full": {r["split"]: strip(r) for r in at_step if r["kind"] == "full"}}


# --------------------------------------------------------------------------------------
# heads.json / heads.md / heads.png.
# --------------------------------------------------------------------------------------


def _pct(value) -> str:
  return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _is_selected(result: dict, layer: int, head: int) -> bool:
  mask = np.asarray(result["mask"])
  return layer in result["layers"] and mask[layer].sum() < mask.shape[1] and mask[layer, head] > 0


def markdown(result: dict) -> str:
  """The per-head table (head alone: accuracy / spurious accuracy per split) as Markdown."""
  splits, roles = result["splits"], result["roles"]
  lines = [f"# Heads of {result['workdir']} (step {result['step']})", "",
           f"Selection rule `{result['rule']}` on `{roles['val_ood']}` "
           f"({roles['ood_metric']}); layers {result['layers']}. Cells: accuracy / spurious "
           "accuracy, in %.", "",
           "| Model | " + " | ".join(splits) + " |",
           "|---|" + "---|" * len(splits)]
  for name in ("full", "selected"):
    lines.append(f"| {name} | " + " | ".join(
        f"{_pct(result[name][s]['accuracy'])} / {_pct(result[name][s].get('spurious_accuracy'))}"
        for s in splits) + " |")
  lines += ["", "Each head alone (others of its layer masked, layer rescaled) and removed "
            f"(accuracy on {roles['val_ood']}); * = kept by the selection.", "",
            "| Layer | Head | " + " | ".join(f"alone {s}" for s in splits)
            + f" | removed {roles['val_ood']} |",
            "|---|---|" + "---|" * (len(splits) + 1)]
  for h in result["heads"]:
    star = " *" if _is_selected(result, h["layer"], h["head"]) else ""
    cells = [f"{_pct(h['accuracy'][s])} / {_pct(h['spurious_accuracy'][s])}" for s in splits]
    lines.append(f"| {h['layer']} | {h['head']}{star} | " + " | ".join(cells)
                 + f" | {_pct(h['removed'][roles['val_ood']]['accuracy'])} |")
  if "epoch_oracle" in result:
    e = result["epoch_oracle"]
    lines += ["", f"Epoch oracle (per-eval figures): step {e['step']}, layer {e['layer']}, "
              f"head {e['head']}: " + ", ".join(
                  f"{s} {_pct(m['accuracy'])}" for s, m in sorted(e["metrics"].items()))]
  return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> str:
  """Scatter of the heads alone, robust vs spurious accuracy, on the OOD splits."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  roles = result["roles"]
  panels = list(dict.fromkeys([roles["val_ood"], roles["test_ood"]]))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4), squeeze=False)
  layers = sorted({h["layer"] for h in result["heads"]})
  cmap = plt.get_cmap("viridis", max(len(layers), 2))
  for ax, split in zip(axes[0], panels):
    for i, layer in enumerate(layers):
      rows = [h for h in result["heads"] if h["layer"] == layer]
      xs = [h["spurious_accuracy"][split] or 0.0 for h in rows]
      ys = [h["accuracy"][split] for h in rows]
      ax.scatter(xs, ys, color=cmap(i), s=40, label=f"layer {layer} heads")
      for h, x, y in zip(rows, xs, ys):
        ax.annotate(f"{h['layer']}.{h['head']}", (x, y), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
        if _is_selected(result, h["layer"], h["head"]):
          ax.scatter([x], [y], s=160, facecolors="none", edgecolors="red", linewidths=1.5)
    for name, marker in (("full", "*"), ("selected", "D")):
      m = result[name][split]
      ax.scatter([m.get("spurious_accuracy") or 0.0], [m["accuracy"]], marker=marker, s=120,
                 color="black" if name == "full" else "red", label=f"{name} model")
    ax.scatter([], [], s=160, facecolors="none", edgecolors="red", label="selected heads")
    ax.set(xlabel="spurious accuracy (prediction = spurious attribute)",
           ylabel="accuracy (robust label)", title=f"{split} (rule {result['rule']})")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7, loc="best")
  fig.tight_layout()
  from vitreg_jax import report  # pylint: disable=g-import-not-at-top
  report.save_figure(fig, path, dpi=120)
  return path


def write_outputs(result: dict, out: str) -> dict[str, str]:
  """Writes heads.json, heads.md, heads.png and head_mask.json into `out`; returns the paths."""
  paths = {name: str(epath.Path(out) / name) for name in ("heads.json", "heads.md", "heads.png")}
  _write(paths["heads.json"], json.dumps(result, indent=1))
  _write(paths["heads.md"], markdown(result))
  plot(result, paths["heads.png"])
  paths[MASK_FILE] = save_head_mask(result["mask"], out, rule=result["rule"],
                                    workdir=result["workdir"], step=result["step"])
  return paths


# --------------------------------------------------------------------------------------
# The poster's table across runs.
# --------------------------------------------------------------------------------------

# One implementation with the report's poster table (vitreg_jax/poster.py).
METHODS = poster_lib.METHODS


def is_div(config) -> bool:
  """Whether a run's config trains with the DIV regularizer (weight > 0)."""
  return "DIV" in poster_lib.method(config).split("+")[1:]


def load_result(workdir: str, *, compute_missing: bool = False, **analyze_kwargs) -> dict:
  """A run's `heads.json`; computed (and written) first when missing and `compute_missing`."""
  path = epath.Path(workdir) / "heads.json"
  if path.exists():
    return json.loads(path.read_text())
  if not compute_missing:
    raise FileNotFoundError(f"{path} not found: run `python -m vitreg_jax.heads "
                            f"--workdir={workdir}` first.")
  result = analyze(workdir, **analyze_kwargs)
  write_outputs(result, workdir)
  return result


def poster_table_data(workdirs: Sequence[str], **load_kwargs) -> dict:
  """Per method the test figures (in %) of each run: `{"dataset", "rules", "rows":
  {method: {"id": [...], "ood": [...], "worst_group": [...], "workdirs": [...]}}}`."""
  from vitreg_jax import rundir  # pylint: disable=g-import-not-at-top
  if not workdirs:
    raise ValueError("poster_table needs at least one workdir.")
  new_row = lambda: {"id": [], "ood": [], "worst_group": [], "workdirs": []}
  rows = {m: new_row() for m in METHODS}
  datasets, rules = set(), set()
  for workdir in workdirs:
    result = load_result(workdir, **load_kwargs)
    base = poster_lib.method(rundir.load_config(workdir))
    datasets.add(result["dataset"])
    rules.add(result["rule"])
    for method, which in ((base, "full"), (base + "+SEL", "selected")):
      row = rows.setdefault(method, new_row())
      for key, value in poster_lib.result_figures(result, which).items():
        row[key].append(float("nan") if value is None else value)
      row["workdirs"].append(workdir)
  if len(datasets) > 1:
    raise ValueError(f"The runs use different datasets {sorted(datasets)}; one table per "
                     "dataset.")
  return {"dataset": datasets.pop(), "rules": sorted(rules), "rows": rows}


def _mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  if not len(values) or np.isnan(values).all():
    return "-"
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def poster_table(workdirs: Sequence[str], **load_kwargs) -> str:
  """The poster's table, `Method | ID Acc. | OOD Acc.`, over several runs (seeds x methods).

  ERM / DIV is read from each run's config; `+SEL` rows use each run's selected mask (its
  `heads.json`). Figures are on the test splits, in %, mean ± sample std (ddof=1) over runs;
  Waterbirds adds worst-group accuracy; MNIST-CIFAR and Waterbirds add the poster's numbers.
  `load_kwargs` go to `load_result` (e.g. `compute_missing=True, rule='greedy'`).
  """
  data = poster_table_data(workdirs, **load_kwargs)
  dataset, rows = data["dataset"], data["rows"]
  waterbirds, poster = dataset == "waterbirds", dataset in poster_lib.POSTER
  header = ["Method", "ID Acc.", "OOD Acc."] + (["Worst-group Acc."] if waterbirds else []) \
      + ["Runs"] + (["Poster ID / OOD"] if poster else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, row in rows.items():
    cells = [method, _mean_std(row["id"]), _mean_std(row["ood"])]
    cells += [_mean_std(row["worst_group"])] if waterbirds else []
    paper = poster_lib.paper_text(dataset, method)
    cells += [str(len(row["id"]))] + ([" / ".join(paper) if paper else "-"] if poster else [])
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"{dataset}, test splits, mean ± std over runs; SEL: rule "
               f"{', '.join(data['rules'])} chosen on the OOD validation split.")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vitreg_jax.heads",
                              description=__doc__.splitlines()[0])
  p.add_argument("--workdir", help="a training run's workdir")
  p.add_argument("--layer", default="-1", help="-1 (last), 'all' or a list like '0,3'")
  p.add_argument("--select", default="oracle", choices=RULES, help="selection rule")
  p.add_argument("--k", type=int, default=None, help="heads kept per layer by --select=topk")
  p.add_argument("--topk_score", default="ood", choices=TOPK_SCORES)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--out", default=None, help="output directory (default: the workdir)")
  p.add_argument("--table", nargs="+", metavar="WORKDIR",
                 help="print the poster's table over these runs (their heads.json, computed "
                      "with --layer/--select where missing)")
  p.add_argument("--no_progress", action="store_true")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if bool(args.workdir) == bool(args.table):
    _parser().error("pass exactly one of --workdir=DIR or --table W1 W2 ...")
  kwargs = dict(layer=args.layer, rule=args.select, k=args.k, topk_score=args.topk_score,
                progress=not args.no_progress)
  if args.table:
    table = poster_table(args.table, compute_missing=True, **kwargs)
    print(table)
    if args.out:
      _write(epath.Path(args.out) / "table.md", table)
    return 0
  result = analyze(args.workdir, step=args.step, **kwargs)
  paths = write_outputs(result, args.out or args.workdir)
  print(markdown(result))
  print("Wrote " + ", ".join(paths.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
