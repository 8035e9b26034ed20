"""The figures of `landscape.json` (`landscape.py`), each titled with the objective and the
directions' normalization that produced it.

* `landscape.png`: per run, contours of the loss (top) and accuracy (bottom) over the grid;
  the last column overlays every run's 1-D line, the loss solid, without L2 dashed.
* `landscape_surface.png`: 3-D surfaces of the loss minus its minimum (as the authors' Fig. 1a,
  `losslandscape.ipynb`).
"""

import numpy as np

from vitreg_jax import plotting


def describe(results: list) -> str:
  """Which objective(s) and normalization(s) produced `results`, for the plots' titles."""
  return "; ".join(sorted({f"{r['objective']}, {r['normalization']}-normalized directions"
                           for r in results}))


def _levels(z: np.ndarray, n: int = 24):
  """Contour levels of a loss: logarithmic when it spans more than a factor 20."""
  lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
  if lo > 0 and hi / lo > 20:
    return np.geomspace(lo, hi, n), "log"
  return np.linspace(lo, hi, n), "linear"


def plot_contours(results: list, path: str) -> str:
  """Per run, contours of the loss (top) and accuracy (bottom) over the grid; the last column
  overlays every run's 1-D line."""
  plt = plotting.pyplot()
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  gridded = [r for r in results if "grid" in r]
  lined = [r for r in results if "line" in r]
  cols = len(gridded) + bool(lined)
  fig, axes = plt.subplots(2, cols, figsize=(3.7 * cols, 6.6), squeeze=False)
  for col, r in enumerate(gridded):
    g = r["grid"]
    for row, (name, cmap) in enumerate((("loss", "viridis"), ("accuracy", "magma"))):
      z = np.asarray(g[name])
      levels, scale = _levels(z) if name == "loss" else (np.linspace(0, 1, 21), "linear")
      norm = colors.LogNorm(levels[0], levels[-1]) if scale == "log" else None
      ax = axes[row, col]
      cs = ax.contourf(g["x"], g["y"], z, levels=levels, cmap=cmap, norm=norm)
      ax.contour(g["x"], g["y"], z, levels=levels[::3], colors="w", linewidths=0.4, norm=norm)
      ax.plot(0, 0, "r+", ms=8)
      fig.colorbar(cs, ax=ax, format="%.3g")
      ax.set(title=f"{r['label']}: {name}", xlabel="direction 1", ylabel="direction 2")
      ax.set_aspect("equal")
  if lined:
    for r in lined:
      line = r["line"]
      l, = axes[0, -1].plot(line["alpha"], line["loss"], label=r["label"])
      axes[0, -1].plot(line["alpha"], line["ce"], "--", color=l.get_color())
      axes[1, -1].plot(line["alpha"], line["accuracy"], label=r["label"])
    if min(min(r["line"]["ce"]) for r in lined) > 0:
      axes[0, -1].set_yscale("log")
    axes[0, -1].set(title="loss (dashed: without L2) along d1", xlabel="alpha")
    axes[1, -1].set(title="accuracy along direction 1", xlabel="alpha", ylim=(0, 1))
    axes[0, -1].legend(fontsize=7)
  fig.suptitle(f"Training loss around the trained parameters: {describe(results)}",
               fontsize=10)
  fig.tight_layout()
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")


def plot_surfaces(results: list, path: str) -> str:
  """3-D surfaces of the loss minus its minimum, one panel per run (as the authors' Fig. 1a)."""
  plt = plotting.pyplot()
  gridded = [r for r in results if "grid" in r]
  fig = plt.figure(figsize=(4.2 * len(gridded), 4))
  for i, r in enumerate(gridded, start=1):
    g = r["grid"]
    x, y = np.meshgrid(g["x"], g["y"])
    z = np.asarray(g["loss"])
    ax = fig.add_subplot(1, len(gridded), i, projection="3d")
    ax.plot_surface(x, y, z - z.min(), cmap="plasma", linewidth=0, antialiased=True)
    ax.view_init(elev=25, azim=35)
    ax.set(title=r["label"], xlabel="d1", ylabel="d2", zlabel="loss - min")
  fig.suptitle(describe(results), fontsize=9)
  return plotting.save_figure(fig, path, dpi=90, bbox_inches="tight")
