"""Searches over head masks (numpy only): `greedy_search`, the hill climbing of the `greedy`
selection rule (heads/rules.py), testable with any score function."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def greedy_search(score_fn: Callable[[np.ndarray], np.ndarray], start, layers: Sequence[int],
                  *, min_gain: float = 0.0) -> tuple[np.ndarray, float, list]:
  """Hill climbing over head subsets: flip (add or remove) one head of `layers` at a time.

  Each round scores every mask that differs from the current one by one head of `layers`
  (never masking a whole layer) in a single `score_fn` call and moves to the best one while
  it improves the score by more than `min_gain`; it stops at a local optimum.

  Args:
    score_fn: masks `[M, depth, heads]` -> scores `[M]` (e.g. OOD validation accuracy).
    start: the first mask `[depth, heads]`.
    layers: the layers whose heads may change.
  Returns:
    `(mask, score, path)`; `path` lists `(mask, score)` after each accepted move.
  """
  mask = np.asarray(start, np.float32).copy()
  best = float(score_fn(mask[None])[0])
  path = [(mask.copy(), best)]
  while True:
    candidates = []
    for layer in layers:
      for head in range(mask.shape[1]):
        m = mask.copy()
        m[layer, head] = 1.0 - m[layer, head]
        if m[layer].sum() > 0:
          candidates.append(m)
    if not candidates:
      break
    scores = np.asarray(score_fn(np.stack(candidates)), np.float64)
    i = int(np.argmax(scores))
    if scores[i] <= best + min_gain:
      break
    mask, best = candidates[i], float(scores[i])
    path.append((mask.copy(), best))
  return mask, best, path
