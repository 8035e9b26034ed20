"""A head selection's outputs: `heads.json`, `heads.md` (Markdown), `heads.png` (robust vs
spurious accuracy of every head alone) and the selected `head_mask.json`."""

from __future__ import annotations

import json

from etils import epath
import numpy as np

from vitreg_jax import plotting
from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.training import rundir


def _pct(value) -> str:
  return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _is_selected(result: dict, layer: int, head: int) -> bool:
  mask = np.asarray(result["mask"])
  return layer in result["layers"] and mask[layer].sum() < mask.shape[1] and mask[layer, head] > 0


def markdown(result: dict) -> str:
  """The per-head table (head alone: accuracy / spurious accuracy per split) as Markdown."""
  splits, roles = result["splits"], result["roles"]
  selection = result.get("selection") or {}  # single-head rules name their split and metric
  split = selection.get("split", roles["val_ood"])
  metric = selection.get("metric", roles["ood_metric"])
  lines = [f"# Heads of {result['workdir']} (step {result['step']})", "",
           f"Selection rule `{result['rule']}` on `{split}` ({metric}); layers "
           f"{result['layers']}. Cells: accuracy / spurious accuracy, in %.", "",
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
  plt = plotting.pyplot()
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
  return plotting.save_figure(fig, path, dpi=120)


def write_outputs(result: dict, out: str) -> dict[str, str]:
  """Writes heads.json, heads.md, heads.png and head_mask.json into `out`; returns the paths."""
  paths = {name: str(epath.Path(out) / name) for name in ("heads.json", "heads.md", "heads.png")}
  rundir.write_text(paths["heads.json"], json.dumps(result, indent=1))
  rundir.write_text(paths["heads.md"], markdown(result))
  plot(result, paths["heads.png"])
  paths[masks_lib.MASK_FILE] = masks_lib.save_head_mask(result["mask"], out, rule=result["rule"],
                                    workdir=result["workdir"], step=result["step"])
  return paths
