"""Segmentation metrics from a confusion matrix (rows = ground truth, columns = prediction).

Values `0..K-2` are the tissue classes and the last value `K-1` is background (BCSS-WSSS: TUM, STR, LYM,
NEC, BACK). Definitions, for class c with TP = M[c, c], FP = column sum - TP, FN = row sum - TP:

* IoU_c = TP / (TP + FP + FN), Dice_c = 2 TP / (2 TP + FP + FN), for every value including background.
* mIoU / mDice: mean over the tissue classes only (background excluded), as the reference's
  `iu_per_class[:-1].mean()`.
* FwIoU: sum over all K values of freq_c * IoU_c, freq_c = row sum / total (ground-truth frequency).
* pixel accuracy: trace / total.
* fg/bg Dice, as the reference (DualProtoSeg `utils/evaluate.py: ConfusionMatrixAllClass`, its `mat2`)
  reports it: the binary problem value 0 (TUM) vs every other value (tissue and background); `fg_Dice` is
  the Dice of value 0, `bg_Dice` of the rest, `fg_bg_Dice` their mean (the reference's `mean_fg_bg`).
* tissue/BACK Dice (this project's binary figure): any tissue class vs background; `tissue_Dice`,
  `back_Dice` and their mean `tissue_back_Dice`.

A value with zero union (absent from both ground truth and prediction) has IoU and Dice NaN. With
`mean_mode='nanmean'` (default) the means skip such values; `mean_mode='reference'` is the reference's
plain `.mean()` / `(freq * iu).sum()`: mIoU, mDice, FwIoU and the binary means are NaN as soon as one of
their terms is.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BACKGROUND_NAME = 'BACK'
MEAN_MODES = ('nanmean', 'reference')


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


def _plain_mean(values: np.ndarray) -> float:
  """The reference's `.mean()`: NaN if any entry is NaN (or there are none)."""
  return float(values.mean()) if values.size else math.nan


def _binary_dice(confusion: np.ndarray, first: slice, second: slice) -> tuple[float, float]:
  """Dice of the two sides of the binary problem `first` vs `second` (index ranges of the matrix)."""
  first_first = confusion[first, first].sum()
  first_second = confusion[first, second].sum()    # ground truth `first` predicted as `second`
  second_first = confusion[second, first].sum()
  second_second = confusion[second, second].sum()
  errors = first_second + second_first
  return (float(_safe_ratio(2 * first_first, 2 * first_first + errors)),
          float(_safe_ratio(2 * second_second, 2 * second_second + errors)))


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str], num_tissue_classes: int,
                         ignore_background: bool = False, mean_mode: str = 'nanmean') -> dict:
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
    mean_mode: 'nanmean' (default): values with zero union are left out of mIoU, mDice, FwIoU and the
      binary means. 'reference': plain means as the reference computes them (NaN if any term is NaN).

  Returns:
    JSON-serialisable dict: Python floats `IoU/<name>`, `Dice/<name>` for every value, `mIoU`, `mDice`,
    `FwIoU`, `pixel_accuracy`, `fg_Dice`, `bg_Dice`, `fg_bg_Dice` (value 0 vs the rest, the reference's),
    `tissue_Dice`, `back_Dice`, `tissue_back_Dice` (tissue vs background), and `mean_mode` (the string).
    Fractions in [0, 1]; NaN where undefined (zero union / no pixels), see the module docstring.
  """
  if mean_mode not in MEAN_MODES:
    raise ValueError(f'metrics mean_mode is {mean_mode!r}; expected one of {MEAN_MODES}')
  mean = _nanmean if mean_mode == 'nanmean' else _plain_mean
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
  result['mIoU'] = mean(iou[tissue])
  result['mDice'] = mean(dice[tissue])
  if total == 0:
    result['FwIoU'] = math.nan
  elif mean_mode == 'nanmean':
    seen = np.isfinite(iou) & np.isfinite(frequency)
    result['FwIoU'] = float(np.sum(frequency[seen] * iou[seen]))
  else:  # the reference's `((h.sum(1) / h.sum()) * iu).sum()`: 0 * NaN = NaN for an absent value
    result['FwIoU'] = float(np.sum(frequency * iou))
  result['pixel_accuracy'] = float(_safe_ratio(true_positive.sum(), total))

  # The reference's fg/bg: value 0 (TUM) vs everything else.
  result['fg_Dice'], result['bg_Dice'] = _binary_dice(confusion, slice(0, 1), slice(1, size))
  result['fg_bg_Dice'] = mean(np.array([result['fg_Dice'], result['bg_Dice']]))
  # Tissue (any tissue class) vs background.
  result['tissue_Dice'], result['back_Dice'] = _binary_dice(confusion, tissue, background)
  result['tissue_back_Dice'] = mean(np.array([result['tissue_Dice'], result['back_Dice']]))
  result['mean_mode'] = mean_mode
  return result


def format_metrics_table(metrics: dict) -> str:
  """Fixed-width text table: one row per class with IoU and Dice (%), then the summary figures.

  NaN values print as `n/a`; the last line says how the means treat absent classes (`mean_mode`).
  """
  def pct(value: float) -> str:
    return f'{100.0 * value:8.2f}' if value is not None and math.isfinite(value) else f'{"n/a":>8}'

  names = [key.split('/', 1)[1] for key in metrics if key.startswith('IoU/')]
  first = names[0] if names else 'value 0'       # the reference's fg: value 0 (TUM for BCSS-WSSS)
  back = names[-1] if names else DEFAULT_BACKGROUND_NAME
  summary = (('mIoU', 'mIoU'), ('mDice', 'mDice'), ('FwIoU', 'FwIoU'), ('pixel_accuracy', 'pixel acc'),
             ('fg_Dice', f'fg Dice ({first}, reference)'), ('bg_Dice', 'bg Dice (rest, reference)'),
             ('fg_bg_Dice', f'fg/bg Dice ({first} vs rest, reference)'), ('tissue_Dice', 'tissue Dice'),
             ('back_Dice', f'{back} Dice'), ('tissue_back_Dice', f'tissue/{back} Dice'))
  summary = [(key, label) for key, label in summary if key in metrics]
  width = max([len(name) for name in names] + [len(label) + 1 for _, label in summary] + [12])
  rule = '-' * (width + 16)
  lines = [f'{"class":<{width}}{"IoU %":>8}{"Dice %":>8}', rule]
  for name in names:
    lines.append(f'{name:<{width}}{pct(metrics[f"IoU/{name}"])}{pct(metrics.get(f"Dice/{name}", math.nan))}')
  lines.append(rule)
  for key, label in summary:
    lines.append(f'{label:<{width}}{pct(metrics[key])}')
  if 'mean_mode' in metrics:
    how = ('classes absent from ground truth and prediction skipped' if metrics['mean_mode'] == 'nanmean'
           else 'plain mean: NaN if a class is absent, as the reference')
    lines.append(f'means: {metrics["mean_mode"]} ({how})')
  return '\n'.join(lines)
