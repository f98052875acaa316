"""Tissue detection on a low-resolution thumbnail: Otsu on HSV saturation or on optical density.

Glass is bright and grey (low saturation, optical density near 0); stained tissue is coloured and absorbs.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def tissue_measure(rgb: np.ndarray, method: str) -> np.ndarray:
  """`[H, W, 3]` uint8 -> `[H, W]` float32: HSV saturation in [0, 1] or mean optical density (>= 0)."""
  x = rgb.astype(np.float32)
  if method == 'saturation':
    high, low = x.max(axis=-1), x.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)
  if method == 'od':
    return (-np.log10(np.maximum(x, 1.0) / 255.0)).mean(axis=-1).astype(np.float32)
  raise ValueError(f'unknown tissue method {method!r}')


def tissue_mask(rgb: np.ndarray, method: str, threshold: float = 0.0, min_threshold: float = 0.05,
                min_object_px: int = 0) -> tuple[np.ndarray, float]:
  """`[H, W, 3]` uint8 thumbnail -> (`[H, W]` bool tissue, threshold used).

  `threshold` > 0 is used as given; otherwise Otsu's threshold of the measure, floored at `min_threshold`
  (so a slide of clean glass does not split its noise into "tissue"). 8-connected tissue pieces smaller
  than `min_object_px` pixels (dust, debris) are dropped; thin strands attached to tissue are kept.
  `method='none'`: all tissue.
  """
  if method == 'none':
    return np.ones(rgb.shape[:2], bool), 0.0
  from skimage.filters import threshold_otsu
  measure = tissue_measure(rgb, method)
  if threshold <= 0:
    threshold = float(threshold_otsu(measure)) if np.ptp(measure) > 0 else float(measure.max())
    threshold = max(threshold, min_threshold)
  mask = measure > threshold
  if min_object_px > 1:
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_object_px
    keep[0] = False
    mask = keep[labels]
  return mask, threshold


def fraction_in_box(mask: np.ndarray, box: tuple[float, float, float, float]) -> float:
  """Fraction of tissue in the `(x0, y0, x1, y1)` box given in mask pixels (outside the mask: glass)."""
  x0, y0, x1, y1 = box
  area = max((x1 - x0) * (y1 - y0), 1e-9)
  ix0, iy0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
  ix1, iy1 = min(int(np.ceil(x1)), mask.shape[1]), min(int(np.ceil(y1)), mask.shape[0])
  if ix1 <= ix0 or iy1 <= iy0:
    return 0.0
  # Each mask pixel counts with its overlap with the box (exact area fraction).
  wx = np.clip(np.minimum(np.arange(ix0, ix1) + 1, x1) - np.maximum(np.arange(ix0, ix1), x0), 0, 1)
  wy = np.clip(np.minimum(np.arange(iy0, iy1) + 1, y1) - np.maximum(np.arange(iy0, iy1), y0), 0, 1)
  return float(wy @ mask[iy0:iy1, ix0:ix1].astype(np.float32) @ wx / area)
