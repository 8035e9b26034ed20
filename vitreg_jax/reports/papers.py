"""Every paper's published figures and table layouts, for the report's tables.

* The head-diversity poster's Tables 1-2 (`POSTER`, `METHODS`): a run's method (`method`), its
  ID / OOD / worst-group figures (`figures`, `result_figures`) and the poster's as printed
  (`paper_text`). One implementation behind both places that print the poster's table:
  `python -m vitreg_jax.reports` (metrics.jsonl, `+SEL` rows from heads.json) and
  `python -m vitreg_jax.heads --table` (heads.json); both live in `reports/tables.py`.
* ARViT's Table 1 (`ARVIT`, `ARVIT_DATASETS`) and the row a config belongs to (`arvit_row`).
* "How do ViTs work?": the one figure the slides give (`GAP_OVER_CLS`) and the row label of a
  config (`how_vits_work_row`).

Light on purpose (NumPy-free, no JAX): the report imports it.

  python -m vitreg_jax.reports.papers    # prints the poster's figures
"""

import dataclasses
import math

from vitreg_jax import roles as roles_lib

METHODS = ("ViT+ERM", "ViT+DIV", "ViT+ERM+SEL", "ViT+DIV+SEL")
# papers/diverse-vit-heads-poster.txt, Tables 1 (MNIST-CIFAR) and 2 (Waterbirds):
# method -> ((ID mean, std), (OOD mean, std)) in percent, as printed.
POSTER = {
    "mnist_cifar": {"ViT+ERM": ((88.80, 0.1), (56.87, 4.3)),
                    "ViT+DIV": ((88.40, 0.1), (62.26, 1.8)),
                    "ViT+ERM+SEL": ((90.33, 0.1), (64.40, 2.8)),
                    "ViT+DIV+SEL": ((89.86, 1.1), (70.08, 3.1))},
    "waterbirds": {"ViT+ERM": ((96.55, 0.2), (83.37, 0.4)),
                   "ViT+DIV": ((96.99, 0.1), (83.87, 0.7)),
                   "ViT+ERM+SEL": ((96.50, 0.5), (85.70, 1.6)),
                   "ViT+DIV+SEL": ((96.99, 0.1), (87.96, 0.1))},
}


def method(config) -> str:
  """`ViT+ERM`, `ViT+DIV` (or `ViT+<NAME>` for other regularizers) from a run's config.

  A regularizer with weight 0 does not count: such a run trains with plain ERM.
  """
  names = sorted({dict(r)["name"] for r in (config.get("regularizers") or [])
                  if float(dict(r).get("weight", 1.0)) != 0})
  return "ViT+" + ("+".join(n.upper() for n in names) if names else "ERM")


def paper_text(dataset: str, name: str) -> tuple[str, str] | None:
  """The poster's `("ID mean ± std", "OOD mean ± std")` as printed, or None."""
  figures = POSTER.get(dataset, {}).get(name)
  if figures is None:
    return None
  return tuple(f"{mean:.2f} ± {std:g}" for mean, std in figures)


def reading_roles(dataset: str, splits) -> dict:
  """Where a run's ID and OOD test figures are, from the splits it evaluated (metrics.jsonl):
  `roles.split_roles` as a dict (the keys of a `heads.json`'s `roles`); splits that are
  missing show as missing."""
  return dataclasses.asdict(roles_lib.split_roles(sorted(splits), dataset=dataset,
                                                  missing_ok=True))


def figures(by_split: dict, roles: dict) -> dict:
  """`{"id", "ood", "worst_group"}` in percent (None where not measured) from per-split
  metrics `{split: {metric: value}}` and `roles` (a heads.json's, or `reading_roles`)."""
  def pct(split, metric):
    value = (by_split.get(split) or {}).get(metric)
    return None if value is None or not math.isfinite(value) else 100.0 * value
  return {"id": pct(roles["test_id"], roles["id_metric"]),
          "ood": pct(roles["test_ood"], roles["ood_metric"]),
          "worst_group": pct(roles["test_ood"], "worst_group_accuracy")}


def result_figures(result: dict, which: str, dataset: str | None = None) -> dict:
  """`figures` of a heads.json `result`: `which` = 'full' (all heads) or 'selected' (+SEL).

  Uses the result's `roles` (what the selection treated as ID / OOD); a result without them
  (written by hand or by an older version) gets `reading_roles` of its splits.
  """
  roles = result.get("roles") or reading_roles(dataset or result.get("dataset", ""),
                                               result[which])
  return figures(result[which], roles)


# The spurious-correlation baselines table (reports/baselines.py): its rows, and the published
# Waterbirds worst-group test accuracies (%) of ResNet-50s pretrained on ImageNet, with their
# sources, shown beside ours for orientation (another backbone and recipe).
SPURIOUS_METHODS = ("ERM", "DIV", "ERM+SEL", "DIV+SEL", "DFR", "DFR+SEL", "GroupDRO", "JTT")
SPURIOUS_PUBLISHED = {
    "waterbirds": {
        "ERM": ("about 75", "Kirichenko et al. 2022, Table 1"),
        "JTT": ("86.7", "Liu et al. 2021, Table 1"),
        "GroupDRO": ("91.4 ± 1.1", "Sagawa et al. 2020, as listed by Kirichenko et al. 2022, "
                     "Table 1"),
        "DFR": ("92.9 ± 0.2", "Kirichenko et al. 2022, Table 1"),
    },
}


def spurious_published(dataset: str, method_name: str) -> str:
  """`"86.7 (Liu et al. 2021, Table 1)"`, or `-` where no figure is published."""
  figure = SPURIOUS_PUBLISHED.get(dataset, {}).get(method_name)
  return "-" if figure is None else f"{figure[0]} ({figure[1]})"


# ARViT Table 1 (papers/arvit-attention-regularization.txt), top-1 in percent.
ARVIT_DATASETS = ("cifar10", "cifar100", "oxford_flowers102", "imagenette", "imagewoof")
ARVIT = {
    "ViT-Tiny": (73.30, 53.55, 73.91, 84.72, 61.77),
    "ARViT-Base": (83.13, 76.27, 81.61, 91.18, 73.01),
    "ARViT-L1": (82.02, 75.89, 80.12, 90.58, 72.92),
    "ARViT-L2": (83.63, 76.20, 81.27, 91.56, 74.81),
    "ARViT-L3": (84.76, 76.63, 83.08, 92.05, 75.90),
    "ARViT-L4": (83.31, 76.52, 81.98, 91.88, 75.24),
    "ARViT-L5": (83.70, 76.01, 81.21, 91.30, 73.46),
    "ARViT-L6": (79.81, 74.84, 79.14, 88.77, 70.44),
    "ARViT-R1-1": (88.29, 88.63, 85.58, 95.48, 82.31),
    "ARViT-R1-2": (86.99, 86.40, 85.15, 94.28, 79.61),
    "ARViT-R1-3": (87.17, 84.91, 85.33, 95.36, 82.20),
    "ARViT-R1-4": (87.54, 86.13, 85.31, 95.48, 82.93),
    "ARViT-R1-5": (88.45, 89.65, 85.82, 95.40, 82.70),
    "ARViT-R1-6": (87.55, 87.31, 85.15, 95.78, 81.15),
}
# lambda of either ARViT penalty: the authors' code's (the thesis gives none; configs/arvit.py).
ARVIT_WEIGHT = 0.01
GAP_OVER_CLS = 2.7  # "GAP classifier improves the accuracy by +2.7%" (slides).


def arvit_row(config: dict) -> str | None:
  """ARViT Table 1's row name of a config (None if the config is not one of its models).

  A penalty weight other than `ARVIT_WEIGHT` is part of the name (`ARViT-R1-1 (λ=1)`): such a
  run is not the row's, and its runs are not pooled with it.
  """
  model = config.get("model", {})
  if config.get("model_name") == "vit":
    return "ViT-Tiny" if model.get("variant") == "Ti6x12/16" else None
  if config.get("model_name") != "arvit":
    return None
  regs = config.get("regularizers") or []
  if not regs:
    return "ARViT-Base"
  reg = regs[0]
  layer = int(list(reg.get("layers", [0]))[0]) + 1
  name = {"distance": f"ARViT-L{layer}", "similarity": f"ARViT-R1-{layer}"}.get(reg["name"])
  weight = reg.get("weight", ARVIT_WEIGHT)
  if name and not math.isclose(weight, ARVIT_WEIGHT):
    name += f" (λ={weight:g})"
  return name


def how_vits_work_row(config: dict) -> str:
  """The slides' comparison a config belongs to: ViT (CLS/GAP, local window), ResNet or
  AlterNet."""
  model, name = config.get("model", {}), config.get("model_name")
  if name == "vit":
    label = f"ViT ({'GAP' if model.get('classifier') == 'gap' else 'CLS'})"
    k = model.get("local_window")
    return label + (f", local {k}x{k}" if k else "")
  if name in ("resnet", "preresnet"):  # the authors' post-activation one, or pre-activation
    return f"{'Pre' if name == 'preresnet' else ''}ResNet-{model.get('depth', 18)}"
  msa = model.get("msa_per_stage")
  return "AlterNet" + (f" (MSAs per stage {','.join(map(str, msa))})" if msa else "")


def main() -> int:
  for dataset, rows in POSTER.items():
    print(f"{dataset}:")
    for name in rows:
      id_text, ood_text = paper_text(dataset, name)
      print(f"  {name:12s} ID {id_text:14s} OOD {ood_text}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
