r"""Head selection and per-head diagnostics (head-diversity poster, "Head selection").

The poster ("Learning Diverse Features in Vision Transformers for Improved Generalization")
masks a subset of a layer's attention heads (their outputs set to 0), rescales the output to
compensate, and shows that keeping only the heads that carry the robust feature ("oracle
selection") raises OOD accuracy. This package measures that on a trained run and chooses heads:

* **Per-head evaluation** (`evaluate.py`: `RunEval`, `MaskEvaluator`; masks from
  `masks.py`): every head alone (the other heads of its layer
  masked, the layer rescaled by `heads / kept`, as the models do) and every head removed,
  scored on the label (`accuracy`) and on the spurious attribute (`spurious_accuracy`, how
  often the prediction equals it) on every eval split, at about the cost of one forward pass
  per mask and image and ONE compilation: the splits are read once and kept on the device,
  and each pass scores a chunk of masks on a block of images, running the blocks where the
  masks agree (all but the evaluated layers) once (`Encoder(expand_masks_at=...)`).
* **Selection rules** (`rules.py`, the one home: a table of candidates, a registry, one
  missing-value score, the authors' tie order; `select.py`: `analyze` on one checkpoint;
  validation splits only, test figures are reported, never used), named by what they read:
  OOD validation labels (`oracle`, the authors' best single head, the ceiling; `greedy`;
  `topk`), attribute (group) labels of ID validation data (`id_conflict`: the full model or
  head alone with the best accuracy on the ID examples where label and attribute disagree;
  `conflict_vote`; `worst_group`) and ID validation labels only (`id_val`). A rule
  registered from outside the package (`rules.register`) is named the same way.
* **Selection with less OOD information** (`label_free.py`, estimators in `estimators.py`):
  ID validation labels only (`id_errors`, `id_low_confidence`: the full model's errors or
  least confident examples as a pseudo-minority group), unlabeled OOD inputs (`atc`, `doc`,
  `aline`: estimates of OOD accuracy; `disagreement`: DivDis-style), k OOD labels (`ood_k`,
  `ood_k_atc`); `k_labels.py` draws the oracle's OOD accuracy against k and
  `selection_table.py` tabulates each rule's fraction of the oracle's gain (`--table`).
* **Per-eval head figures during training** (`config.head_eval`, `training.py`): every
  evaluation appends each head's figures to `WORKDIR/heads_eval.jsonl`, so the authors' choice
  of epoch and head (`evaluate_epoch_head_combinations` in their code) needs no checkpoints,
  and writes the validation splits' per-example outputs to `WORKDIR/heads_examples/`
  (`examples.py`) for the rules that read more than the figures.
* **The authors' statistics** (`summary.py`): ERM / DIV rows at the evaluation best on
  `val_ood`, +SEL rows at each rule's (evaluation, head) choice (their
  `get_experiment_summary`); **the poster's table across runs** (`--table`) is
  `vitreg_jax.reports.tables.poster_table`, the same table the report prints.
* **Outputs** (`outputs.py`): heads.json / heads.md / heads.png / head_mask.json.

Command (`__main__.py`)::

  python -m vitreg_jax.heads --workdir=DIR [--layer=-1|all|0,3] \
      [--select=RULE] [--k=2] [--ood_labels=16] [--out=DIR] [--rules_module=MODULE]
  python -m vitreg_jax.heads --table W1 W2 ... [--select=RULE,RULE] \
      [--statistic=authors|final] [--out=DIR]

writes `heads.json`, `heads.md`, `heads.png` and the selected mask `head_mask.json` (usable as
`config.head_mask=DIR/head_mask.json`); `--table` writes `table.md`, `table.json` and
`k_labels.png`. See docs/heads.md.
"""

# The rules of heads/label_free.py register on import: any import of the package (the
# command, the report's table, `rules.get`) can name them.
from vitreg_jax.heads import label_free  # pylint: disable=unused-import,g-bad-import-order
