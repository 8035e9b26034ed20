"""Per-example outputs of a trained run over a split: logits, predictions, the penultimate
features (`out['pre_logits']`, the head's input) and the split's labels and attributes.

Used by JTT (the identification model's errors on the train split, `vitreg_jax/baselines/jtt.py`)
and DFR (the frozen features the last layer is refit on, `vitreg_jax/baselines/dfr.py`).
Evaluation preprocessing (no augmentation), every example once, padding dropped
(`Dataset.read_split`); single process (an analysis, not training). A head mask
(`[depth, heads]`) gives the features of a head-selected model (DFR + SEL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _forward(model, normalize):
  @jax.jit
  def fn(variables, images, head_mask):
    x = normalize(images) if normalize is not None else images
    kwargs = {} if head_mask is None else {"head_mask": head_mask}
    logits, out = model.apply(variables, x, train=False, **kwargs)
    if "pre_logits" not in out:
      raise ValueError(f"{type(model).__name__} has no out['pre_logits'] (the head's input).")
    return logits.astype(jnp.float32), out["pre_logits"].astype(jnp.float32)
  return fn


def extract(run, split: str, *, head_mask=None, batch_size: int | None = None) -> dict:
  """`{logits [n, K], pred [n], features [n, D], label [n], <attributes> [n]}` of `split`.

  Read with `Dataset.read_split` (the one reading of a split for evaluation: every example
  once, padding dropped).

  Args:
    run: `rundir.load_run(workdir)`.
    split: any split of the run's dataset (sliced names allowed, e.g. 'train[:10%]').
    head_mask: optional `[depth, heads]` mask (None: all heads).
    batch_size: default the run's eval batch size.
  """
  config, dataset = run.config, run.dataset
  batch_size = int(batch_size or config.get("eval_batch_size") or config.batch_size)
  fn = _forward(run.model, dataset.normalization)
  variables = jax.device_put(run.variables)
  mask = None if head_mask is None else jnp.asarray(head_mask, jnp.float32)

  def predict(batch):
    logits, feats = fn(variables, batch["image"], mask)
    return {"logits": logits, "features": feats}

  out = dataset.read_split(split, batch_size=batch_size, predict=predict, process_index=0,
                           process_count=1)
  del out["mask"]  # All ones: the padding is dropped.
  out["pred"] = out["logits"].argmax(-1)
  return out
