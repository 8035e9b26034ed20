"""Learning curves of the runs a report table covers (`curves_<table>.png`).

Train loss, each regularizer term `reg/<name>` and each eval split's accuracy against the
step, every run of the table overlaid, the legend below the panels.
"""

import math

from vitreg_jax import plotting


def plot_curves(runs: list, labels: dict, path: str, title: str = "") -> str | None:
  """Train loss, each `reg/<name>` term and each split's eval accuracy vs step; runs overlaid."""
  if not any(r.train or r.evals for r in runs):
    return None
  plt = plotting.pyplot()
  regs = sorted({k for r in runs for m in r.train.values() for k in m if k.startswith("reg/")})
  splits = sorted({s for r in runs for s in r.evals})
  panels = [("train", "loss", "train loss")] + [("train", k, k) for k in regs] + \
      [(s, "accuracy", f"{s} accuracy") for s in splits]
  cols = min(3, len(panels))
  nrows = math.ceil(len(panels) / cols)
  width = 4.2 * cols
  # The legend goes below the panels, in as many columns as its longest label allows, so
  # long labels (a sweep's overrides) and many runs stay readable.
  longest = max(len(labels[r.workdir]) for r in runs)
  ncol = max(1, min(len(runs), int(width // (0.055 * longest + 0.6))))
  legend_h = 0.17 * math.ceil(len(runs) / ncol) + 0.2
  fig, axes = plt.subplots(nrows, cols, figsize=(width, 3.2 * nrows + legend_h),
                           squeeze=False)
  colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
  for ax, (split, key, name) in zip(axes.flat, panels):
    for i, run in enumerate(runs):
      series = run.train if split == "train" else run.evals.get(split, {})
      steps = sorted(s for s in series if key in series[s])
      if steps:  # Past the palette, the colours repeat with a dashed line.
        ax.plot(steps, [series[s][key] for s in steps], color=colors(i % colors.N),
                ls="-" if i < colors.N else "--", marker="." if split != "train" else None,
                lw=1.2, label=labels[run.workdir])
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    if key == "loss" or key.startswith("reg/"):
      ax.set_yscale("log")
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  handles, names = axes.flat[0].get_legend_handles_labels()
  for ax in axes.flat:
    h, n = ax.get_legend_handles_labels()
    if len(n) > len(names):
      handles, names = h, n
  fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, legend_h / (3.2 * nrows + legend_h), 1, 0.97))
  plotting.save_figure(fig, path, dpi=110)
  return path
