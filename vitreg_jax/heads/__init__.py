r"""Head selection and per-head diagnostics (head-diversity poster, "Head selection").

The poster ("Learning Diverse Features in Vision Transformers for Improved Generalization")
masks a subset of a layer's attention heads (their outputs set to 0), rescales the output to
compensate, and shows that keeping only the heads that carry the robust feature ("oracle
selection") raises OOD accuracy. This package measures that on a trained run and chooses heads:

* **Per-head evaluation** (`evaluate.py`: `evaluate_masks`, `MaskEvaluator`; masks from
  `masks.py`): every head alone (the other heads of its layer
  masked, the layer rescaled by `heads / kept`, as the models do) and every head removed,
  scored on the label (`accuracy`) and on the spurious attribute (`spurious_accuracy`, how
  often the prediction equals it) on every eval split, at about the cost of one forward pass
  per mask and image and ONE compilation: the splits are read once and kept on the device,
  and each pass scores a chunk of masks on a block of images, running the blocks where the
  masks agree (all but the evaluated layers) once (`Encoder(expand_masks_at=...)`).
* **Selection rules** (`select.py`: `RULES`, `analyze`; validation splits only, test figures are reported, never used):
  `oracle` (the authors': the single head with the best OOD validation accuracy), `greedy`
  (flip one head at a time while OOD validation accuracy improves), `topk` (the k best heads
  by a per-head score) and `id_conflict`, which needs no OOD data: on the ID validation
  examples where the spurious attribute disagrees with the label, keep the heads that follow
  the label more often than the attribute.
* **Per-eval head figures during training** (`config.head_eval`, `training.py`): every
  evaluation appends each head's figures to `WORKDIR/heads_eval.jsonl`, so the authors' choice
  of epoch and head (`evaluate_epoch_head_combinations` in their code) needs no checkpoints
  (`select.epoch_oracle`).
* **Outputs** (`outputs.py`) and **the poster's table across runs** (`--table`, built by
  `vitreg_jax.reports.tables.heads_poster_table`, the report's poster-table module).

Command (`__main__.py`)::

  python -m vitreg_jax.heads --workdir=DIR [--layer=-1|all|0,3] \
      [--select=oracle|greedy|topk|id_conflict|worst_group|val_accuracy] [--k=2] [--out=DIR]
  python -m vitreg_jax.heads --table W1 W2 ... [--out=DIR]

writes `heads.json`, `heads.md`, `heads.png` and the selected mask `head_mask.json` (usable as
`config.head_mask=DIR/head_mask.json`); `--table` writes `table.md`. See docs/heads.md.
"""
