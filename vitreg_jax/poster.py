"""The head-diversity poster's Tables 1-2: its figures, a run's method and its ID / OOD figures.

One implementation for the two places that print the poster's table: `vitreg_jax.heads
--table` (from each run's `heads.json`) and `vitreg_jax.report` (from `metrics.jsonl`, with
the `+SEL` rows from `heads.json`). Both name a run's method with `method`, read the
head-selection figures with `result_figures` and show the poster's numbers from `POSTER`.

Light on purpose (NumPy-free, no JAX): the report imports it.

  python -m vitreg_jax.poster    # prints the poster's figures
"""

import math

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


def roles_from_splits(dataset: str, splits) -> dict:
  """Where a run's ID and OOD test figures are, from the splits it evaluated (metrics.jsonl).

  The same keys as a `heads.json`'s `roles`: `test_id`, `test_ood`, `id_metric`, `ood_metric`.
  `{test,val}_{id,ood}` splits (MNIST-CIFAR, dominoes; validation when no test split was
  evaluated); Waterbirds: `test` (else `val`), the group metrics on that split.
  """
  splits = set(splits)
  if dataset == "waterbirds":
    split = "test" if "test" in splits else "val"
    return dict(test_id=split, test_ood=split, id_metric="accuracy",
                ood_metric="mean_group_accuracy")
  for prefix in ("test", "val"):
    if f"{prefix}_id" in splits and f"{prefix}_ood" in splits:
      return dict(test_id=f"{prefix}_id", test_ood=f"{prefix}_ood", id_metric="accuracy",
                  ood_metric="accuracy")
  return dict(test_id="test_id", test_ood="test_ood", id_metric="accuracy",
              ood_metric="accuracy")


def figures(by_split: dict, roles: dict) -> dict:
  """`{"id", "ood", "worst_group"}` in percent (None where not measured) from per-split
  metrics `{split: {metric: value}}` and `roles` (a heads.json's, or `roles_from_splits`)."""
  def pct(split, metric):
    value = (by_split.get(split) or {}).get(metric)
    return None if value is None or not math.isfinite(value) else 100.0 * value
  return {"id": pct(roles["test_id"], roles["id_metric"]),
          "ood": pct(roles["test_ood"], roles["ood_metric"]),
          "worst_group": pct(roles["test_ood"], "worst_group_accuracy")}


def result_figures(result: dict, which: str, dataset: str | None = None) -> dict:
  """`figures` of a heads.json `result`: `which` = 'full' (all heads) or 'selected' (+SEL).

  Uses the result's `roles` (what the selection treated as ID / OOD); a result without them
  (written by hand or by an older version) gets `roles_from_splits` of its splits.
  """
  roles = result.get("roles") or roles_from_splits(dataset or result.get("dataset", ""),
                                                   result[which])
  return figures(result[which], roles)


def main() -> int:
  for dataset, rows in POSTER.items():
    print(f"{dataset}:")
    for name in rows:
      id_text, ood_text = paper_text(dataset, name)
      print(f"  {name:12s} ID {id_text:14s} OOD {ood_text}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
