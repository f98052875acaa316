"""Stub segmenters with exactly known outputs (tests, bench, demo without a trained model)."""

from __future__ import annotations

import numpy as np


def nearest_colour_scores(colours: np.ndarray, background_value: int, glass_rgb=(243, 242, 240)):
  """`scores_fn` mapping each pixel to a one-hot score of its nearest flat colour (glass -> background).

  Args:
    colours: `[K, 3]` uint8 class colours as painted on the slide (the background's entry is unused).
    background_value: class value of glass.
  Returns:
    `tiles uint8 [B, S, S, 3] -> float32 [B, S, S, K]`.
  """
  refs = np.asarray(colours, np.float32).copy()
  refs[background_value] = glass_rgb
  num_classes = len(refs)

  def scores_fn(tiles: np.ndarray) -> np.ndarray:
    x = tiles.reshape(-1, 3).astype(np.float32)
    # |x - r|^2 = |x|^2 - 2 x.r + |r|^2; |x|^2 is the same for every r.
    nearest = np.argmin((refs ** 2).sum(-1) - 2.0 * x @ refs.T, axis=-1)
    return np.eye(num_classes, dtype=np.float32)[nearest].reshape(*tiles.shape[:-1], num_classes)

  return scores_fn


def constant_scores(batch_size: int, tile_size: int, num_classes: int, value: int = 0):
  """Zero-cost `scores_fn`: the same one-hot `value` scores for every tile (measures the pipeline alone)."""
  scores = np.zeros((batch_size, tile_size, tile_size, num_classes), np.float32)
  scores[..., value] = 1.0
  return lambda tiles: scores
