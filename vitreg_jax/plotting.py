"""matplotlib for every figure of the package: `pyplot()` and `save_figure(fig, path)`.

Heads, analyses, sweeps and reports draw with the non-interactive backend (no display on
servers) and save to any `etils.epath` path (local or `gs://...`). matplotlib is imported
inside the functions, so importing this module costs nothing.
"""

import io
import os

from etils import epath


def pyplot():
  """matplotlib.pyplot with the non-interactive backend (no display on servers)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path, **kwargs) -> str:
  """Saves and closes a matplotlib figure at any `etils.epath` path (format by its suffix,
  PNG without one); `kwargs` go to `fig.savefig` (dpi, bbox_inches). Returns `path`."""
  buffer = io.BytesIO()  # matplotlib writes local files or file objects; epath's may not seek.
  fig.savefig(buffer, format=os.path.splitext(str(path))[1][1:] or "png", **kwargs)
  pyplot().close(fig)
  epath.Path(path).write_bytes(buffer.getvalue())
  return path
