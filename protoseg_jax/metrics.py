"""Segmentation metrics from a confusion matrix (rows = ground truth, columns = prediction).

Values `0..K-2` are the tissue classes and the last value `K-1` is background (BCSS-WSSS: TUM, STR, LYM,
NEC, BACK). Definitions, for class c with TP = M[c, c], FP = column sum - TP, FN = row sum - TP:

* IoU_c = TP / (TP + FP + FN), Dice_c = 2 TP / (2 TP + FP + FN), for every value including background.
* mIoU / mDice: mean over the tissue classes only (background excluded), as the reference's
  `iu_per_class[:-1].mean()`.
* FwIoU: sum over all K values of freq_c * IoU_c, freq_c = row sum / total (ground-truth frequency).
* pixel accuracy: trace / total.
* fg/bg Dice: the binary problem tissue (any tissue class) vs background; `fg_Dice` is the Dice of the
  foreground, `bg_Dice` of the background, `fg_bg_Dice` their mean.

A value with zero union (absent from both ground truth and prediction) has IoU and Dice NaN; the means
use `nanmean`, so such classes are skipped (the reference's plain `.mean()` would give NaN instead).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BACKGROUND_NAME = 'BACK'


def confusion_matrix(target: jax.Array, pred: jax.Array, num_values: int,
                     valid: Optional[jax.Array] = None) -> jax.Array:
  """Counts of (ground truth, prediction) pairs; jit-friendly (one `bincount`, static `num_values`).

  Args:
    target: integer ground truth of any shape, e.g. `[B, H, W]`, values in `0..K-1`.
    pred: integer prediction, same shape, values in `0..K-1`.
    num_values: K (tissue classes + background); static.
    valid: optional bool array of the same shape (or broadcastable to it); `False` pixels are left out
      (e.g. padded samples of a last, partial batch). Pixels whose target or prediction is outside
      `0..K-1` (e.g. an ignore label 255) are always left out.

  Returns:
    `[K, K]` int32, rows = ground truth, columns = prediction. Each call must count < 2**31 pixels;
    accumulate across batches on the host (or in int64) for larger splits.
  """
  shape = target.shape
  target = target.astype(jnp.int32).reshape(-1)
  pred = pred.astype(jnp.int32).reshape(-1)
  weights = (target >= 0) & (target < num_values) & (pred >= 0) & (pred < num_values)
  if valid is not None:
    weights = weights & jnp.broadcast_to(valid.astype(bool), shape).reshape(-1)
  index = jnp.where(weights, target * num_values + pred, 0)
  counts = jnp.bincount(index, weights=weights.astype(jnp.int32), length=num_values * num_values)
  return counts.reshape(num_values, num_values).astype(jnp.int32)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """`numerator / denominator` with NaN where the denominator is 0."""
  numerator = np.asarray(numerator, np.float64)
  denominator = np.asarray(denominator, np.float64)
  out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
  np.divide(numerator, denominator, out=out, where=denominator > 0)
  return out


def _nanmean(values: np.ndarray) -> float:
  """Mean of the finite entries; NaN when there are none (no warning)."""
  finite = values[np.isfinite(values)]
  return float(finite.mean()) if finite.size else math.nan


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str], num_tissue_classes: int,
                         ignore_background: bool = False) -> dict:
  """IoU / Dice per value, mIoU, mDice, FwIoU, pixel accuracy and fg/bg Dice from a `[K, K]` matrix.

  Args:
    confusion: `[K, K]` counts, rows = ground truth, columns = prediction; the values
      `num_tissue_classes..K-1` (normally just the last) are background.
    class_names: K names, or K-1 tissue names (the last value is then named 'BACK').
    num_tissue_classes: number of tissue classes (K-1 for BCSS-WSSS: 4).
    ignore_background: `True` is the older WSSS-Tissue protocol: pixels whose ground truth is background
      are dropped from the matrix before anything is computed (tissue predicted as background still
      counts as a false negative). `False` (default) keeps every pixel: background counts in the matrix
      (and in FwIoU / pixel accuracy) but not in mIoU / mDice.

  Returns:
    JSON-serialisable dict of Python floats: `IoU/<name>`, `Dice/<name>` for every value, `mIoU`, `mDice`,
    `FwIoU`, `pixel_accuracy`, `fg_Dice`, `bg_Dice`, `fg_bg_Dice`. Fractions in [0, 1]; NaN where undefined
    (zero union / no pixels), see the module docstring.
  """
  confusion = np.array(confusion, np.float64)
  size = confusion.shape[0]
  if confusion.shape != (size, size):
    raise ValueError(f'confusion matrix must be square, got {confusion.shape}')
  if not 0 < num_tissue_classes < size:
    raise ValueError(f'num_tissue_classes={num_tissue_classes} must be in 1..{size - 1}')
  names = list(class_names)
  if len(names) == size - 1:
    names.append(DEFAULT_BACKGROUND_NAME)
  if len(names) != size:
    raise ValueError(f'{len(names)} class names for a {size}x{size} confusion matrix')
  if ignore_background:
    confusion[num_tissue_classes:, :] = 0.0

  true_positive = np.diag(confusion)
  row_sums = confusion.sum(axis=1)
  col_sums = confusion.sum(axis=0)
  total = confusion.sum()
  iou = _safe_ratio(true_positive, row_sums + col_sums - true_positive)
  dice = _safe_ratio(2 * true_positive, row_sums + col_sums)
  frequency = _safe_ratio(row_sums, total)

  result: dict = {}
  for index, name in enumerate(names):
    result[f'IoU/{name}'] = float(iou[index])
    result[f'Dice/{name}'] = float(dice[index])
  tissue = slice(0, num_tissue_classes)
  background = slice(num_tissue_classes, size)
  result['mIoU'] = _nanmean(iou[tissue])
  result['mDice'] = _nanmean(dice[tissue])
  seen = np.isfinite(iou) & np.isfinite(frequency)
  result['FwIoU'] = float(np.sum(frequency[seen] * iou[seen])) if total > 0 else math.nan
  result['pixel_accuracy'] = float(_safe_ratio(true_positive.sum(), total))

  # Binary tissue-vs-background problem.
  fg_fg = confusion[tissue, tissue].sum()
  fg_bg = confusion[tissue, background].sum()    # tissue predicted as background
  bg_fg = confusion[background, tissue].sum()    # background predicted as tissue
  bg_bg = confusion[background, background].sum()
  result['fg_Dice'] = float(_safe_ratio(2 * fg_fg, 2 * fg_fg + fg_bg + bg_fg))
  result['bg_Dice'] = float(_safe_ratio(2 * bg_bg, 2 * bg_bg + fg_bg + bg_fg))
  result['fg_bg_Dice'] = _nanmean(np.array([result['fg_Dice'], result['bg_Dice']]))
  return result


def format_metrics_table(metrics: dict) -> str:
  """Fixed-width text table: one row per class with IoU and Dice (%), then the summary figures.

  NaN values print as `n/a`.
  """
  def pct(value: float) -> str:
    return f'{100.0 * value:8.2f}' if value is not None and math.isfinite(value) else f'{"n/a":>8}'

  names = [key.split('/', 1)[1] for key in metrics if key.startswith('IoU/')]
  width = max([len(name) for name in names] + [12])
  rule = '-' * (width + 16)
  lines = [f'{"class":<{width}}{"IoU %":>8}{"Dice %":>8}', rule]
  for name in names:
    lines.append(f'{name:<{width}}{pct(metrics[f"IoU/{name}"])}{pct(metrics.get(f"Dice/{name}", math.nan))}')
  lines.append(rule)
  summary = (('mIoU', 'mIoU'), ('mDice', 'mDice'), ('FwIoU', 'FwIoU'), ('pixel_accuracy', 'pixel acc'),
             ('fg_Dice', 'fg Dice'), ('bg_Dice', 'bg Dice'), ('fg_bg_Dice', 'fg/bg Dice'))
  for key, label in summary:
    if key in metrics:
      lines.append(f'{label:<{width}}{pct(metrics[key])}')
  return '\n'.join(lines)
