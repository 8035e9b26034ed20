"""The figures of `hessian.json` (one entry of `runs` per workdir and step).

* `hessian.png`: histograms of the negative and positive per-batch top-k eigenvalues (as a
  fraction of all of a run's eigenvalues, so counts compare), the dataset Hessian's top-k as
  dashed lines of the same colour, and the SLQ densities when computed; a second row for the
  objective without its L2 term when the runs hold `without_l2` (`--without_l2`). Each row
  names its objective (`objective.describe_l2`).
* `hessian_steps.png` (several `--step`): the slides' "early phase of training" panels, one
  column per step, negative (top) and positive (bottom) eigenvalues, runs overlaid; two more
  rows without L2.
* `hessian_blocks.png` (`--per_block`): the top eigenvalue and the Hutchinson trace of every
  block against normalized depth (circles: MSA, squares: MLP, triangles: Conv), mean over the
  batches with min-max bars (or the dataset Hessian's value when only `--over=dataset`);
  dashed: without L2.
"""

import collections

import numpy as np

from vitreg_jax import plotting

MARKERS = {"msa": "o", "mlp": "s", "conv": "^"}
OPERATOR_NAMES = {"hessian": "Hessian", "ggn": "Gauss-Newton"}


def _eigenvalues(r) -> np.ndarray:
  return np.asarray(r.get("eigenvalues", []), np.float64).ravel()


def _histograms(axes, results, colors) -> None:
  """Negative (|lambda|, axis inverted) and positive eigenvalue histograms on two axes."""
  for r in results:
    lam, color = _eigenvalues(r), colors[r["label"]]
    total = max(lam.size, 1)
    data_lam = np.asarray(r.get("dataset", {}).get("eigenvalues", []), np.float64)
    for ax, sign in ((axes[0], -1), (axes[1], 1)):
      part = lam[sign * lam > 0]
      if part.size:
        ax.hist(sign * part, bins=30, weights=np.full(part.size, 1.0 / total), color=color,
                histtype="step", lw=1.5, label=f"{r['label']} ({part.size}/{total})")
      for x in data_lam[sign * data_lam > 0]:
        ax.axvline(sign * x, color=color, ls="--", lw=1)
  axes[0].set(title="negative eigenvalues", xlabel="|eigenvalue|", ylabel="fraction")
  axes[0].invert_xaxis()
  axes[1].set(title="positive eigenvalues", xlabel="eigenvalue")
  for ax in axes:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)


def _colors(results) -> dict:
  return {r["label"]: f"C{i % 10}" for i, r in enumerate(results)}


def without_l2(results: list) -> list:
  """The runs' figures without the L2 term (`r['without_l2']` with the run's label, step,
  operator...), for the runs that hold them."""
  return [{**r, **r["without_l2"]} for r in results if "without_l2" in r]


def _objectives(results: list) -> str:
  return "; ".join(sorted({r.get("objective", "CE + L2") for r in results}))


def _densities(ax, results, colors) -> None:
  for r in results:
    if "density" in r:
      ax.plot(r["density"]["grid"], r["density"]["values"], label=r["label"],
              color=colors[r["label"]])
  ax.set(title="SLQ density", xlabel="eigenvalue", yscale="log")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)


def plot(results: list, path: str) -> str:
  """`hessian.png`: eigenvalue histograms (and SLQ densities) of every run, a second row
  without the L2 term when the runs hold it."""
  plt = plotting.pyplot()
  rows = [results] + ([without_l2(results)] if without_l2(results) else [])
  has_density = any("density" in r for row in rows for r in row)
  fig, axes = plt.subplots(len(rows), 3 if has_density else 2, squeeze=False,
                           figsize=(13 if has_density else 9, 3.6 * len(rows)))
  colors = _colors(results)
  for ax_row, row in zip(axes, rows):
    _histograms(ax_row[:2], row, colors)
    if has_density:
      _densities(ax_row[2], row, colors)
    ax_row[0].set_ylabel(f"{_objectives(row)}\nfraction", fontsize=8)
  r0 = results[0]
  over = " (dashed: over the dataset)" if any("dataset" in r for r in results) else ""
  fig.suptitle(f"{OPERATOR_NAMES[r0['operator']]} top-{r0['top_k']} eigenvalues per mini-batch "
               f"({r0['method']}){over}", fontsize=10)
  fig.tight_layout()
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


def plot_steps(results: list, path: str) -> str:
  """`hessian_steps.png`: one column of negative / positive histograms per step."""
  plt = plotting.pyplot()
  by_step = collections.defaultdict(list)
  for r in results:
    by_step[r["step"]].append(r)
  steps = sorted(by_step)
  pair = bool(without_l2(results))
  fig, axes = plt.subplots(4 if pair else 2, len(steps), figsize=(3.4 * len(steps), 12 if pair
                                                                  else 6), squeeze=False)
  names = {r["label"]: r["label"].split(" @")[0] for r in results}
  colors = {label: f"C{sorted(set(names.values())).index(n) % 10}" for label, n in names.items()}
  for j, step in enumerate(steps):
    for top, rows, what in ((0, by_step[step], _objectives(results)),
                            (2, without_l2(by_step[step]), "without L2")):
      if rows:
        _histograms(axes[top:top + 2, j], rows, colors)
        axes[top, j].set_title(f"step {step}: negative\n{what}", fontsize=8)
        axes[top + 1, j].set_title(f"step {step}: positive", fontsize=8)
  fig.suptitle(f"{OPERATOR_NAMES[results[0]['operator']]} max eigenvalue spectra through "
               "training", fontsize=10)
  fig.tight_layout()
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


def _block_values(block: dict, key: str) -> np.ndarray:
  """Per-batch values of `key` (top eigenvalue: the first of each batch's top-k)."""
  source = block if key in block else block.get("dataset", {})
  values = np.asarray(source.get(key, []), np.float64)
  if key == "eigenvalues":
    values = values.reshape(-1, values.shape[-1])[:, 0] if values.size else values
  return np.atleast_1d(values)


def plot_blocks(results: list, path: str) -> str:
  """`hessian_blocks.png`: top eigenvalue and trace per block against normalized depth."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  colors = _colors(results)
  for r in (r for r in without_l2(results) if r.get("blocks")):
    depth = np.linspace(0, 1, len(r["blocks"]))
    for ax, key in zip(axes, ("eigenvalues", "trace")):
      ax.plot(depth, [_block_values(b, key).mean() for b in r["blocks"]], ls="--", lw=1,
              color=colors[r["label"]], label=f"{r['label']} without L2")
  for r in (r for r in results if r.get("blocks")):
    depth = np.linspace(0, 1, len(r["blocks"]))
    for ax, key in zip(axes, ("eigenvalues", "trace")):
      values = [_block_values(b, key) for b in r["blocks"]]
      mean = np.array([v.mean() for v in values])
      ax.plot(depth, mean, color=colors[r["label"]], lw=1, label=r["label"])
      for x, v, m, b in zip(depth, values, mean, r["blocks"]):
        ax.errorbar(x, m, yerr=[[m - v.min()], [v.max() - m]], color=colors[r["label"]],
                    marker=MARKERS.get(b["kind"], "x"), ms=6, capsize=2,
                    mfc="none" if b["kind"] == "msa" else colors[r["label"]])
  axes[0].set(title="top eigenvalue per block (o MSA, s MLP, ^ Conv)", yscale="symlog",
              xlabel="normalized depth", ylabel="eigenvalue")
  axes[1].set(title="trace per block (Hutchinson)", yscale="symlog",
              xlabel="normalized depth", ylabel="trace")
  axes[0].legend(fontsize=7)
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


def plot_all(results: list, out: str) -> list:
  """Every figure that `results` support; returns the paths written."""
  paths = [plot(results, f"{out}/hessian.png")]
  if len({r["step"] for r in results}) > 1:
    paths.append(plot_steps(results, f"{out}/hessian_steps.png"))
  if any(r.get("blocks") for r in results):
    paths.append(plot_blocks(results, f"{out}/hessian_blocks.png"))
  return paths


def print_summary(results: list) -> None:
  """One line per run (and per block) on stdout; the same without L2 where computed."""
  for r in results:
    _print_one(r)
    if "without_l2" in r:
      _print_one({**r, **r["without_l2"], "label": f"{r['label']} without L2"})


def _print_one(r: dict) -> None:
  """One run's line and its blocks'."""
  lam = _eigenvalues(r)
  line = f"{r['label']} [{r.get('objective', 'CE + L2')}]:"
  if lam.size:
    line += f" {np.mean(lam < 0):.0%} negative, max {lam.max():.4g}, min {lam.min():.4g}"
  if "trace" in r:
    line += f", trace {np.mean(r['trace']):.4g}"
  if "dataset" in r:
    line += f"; dataset top-{len(r['dataset']['eigenvalues'])} {r['dataset']['eigenvalues']}"
  print(line)
  for b in r.get("blocks", []):
    print(f"  {b['label']:>18} {b['kind']:>4} {b['num_params']:>8} params: top "
          f"{_block_values(b, 'eigenvalues').mean():.4g}, trace "
          f"{_block_values(b, 'trace').mean():.4g}")
