"""Segmentation metrics from a confusion matrix (rows = ground truth, columns = prediction)."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(target: jax.Array, pred: jax.Array, num_values: int,
                     valid: Optional[jax.Array] = None) -> jax.Array:
  """`[K, K]` int32 counts of (target, pred) pairs; pixels with `valid == False` are left out."""
  index = target.astype(jnp.int32).reshape(-1) * num_values + pred.astype(jnp.int32).reshape(-1)
  weights = None if valid is None else valid.reshape(-1).astype(jnp.int32)
  counts = jnp.bincount(index, weights=weights, length=num_values * num_values)
  return counts.reshape(num_values, num_values).astype(jnp.int32)


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str], num_tissue_classes: int,
                         ignore_background: bool = False) -> dict:
  """Per-class IoU and Dice, mIoU / mean Dice over the tissue classes, FwIoU, pixel accuracy, fg/bg Dice.

  The last row/column is background. It counts in the matrix (so tissue predicted as background is a false
  negative) but not in the means. `ignore_background=True` is the older WSSS-Tissue protocol: pixels whose
  ground truth is background are removed before anything is computed. A class absent from both ground truth
  and prediction has IoU/Dice NaN and is skipped by the means.
  """
  confusion = np.asarray(confusion, np.float64)
  if ignore_background:
    confusion = confusion.copy()
    confusion[num_tissue_classes:] = 0
  true_positive = np.diag(confusion)
  false_positive = confusion.sum(axis=0) - true_positive
  false_negative = confusion.sum(axis=1) - true_positive
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = true_positive / (true_positive + false_positive + false_negative)
    dice = 2 * true_positive / (2 * true_positive + false_positive + false_negative)
    frequency = confusion.sum(axis=1) / confusion.sum()
  result = {}
  for index, name in enumerate(class_names):
    result[f'IoU/{name}'] = float(iou[index])
    result[f'Dice/{name}'] = float(dice[index])
  tissue = slice(0, num_tissue_classes)
  result['mIoU'] = float(np.nanmean(iou[tissue])) if np.isfinite(iou[tissue]).any() else float('nan')
  result['mDice'] = float(np.nanmean(dice[tissue])) if np.isfinite(dice[tissue]).any() else float('nan')
  seen = np.isfinite(iou)
  result['FwIoU'] = float(np.sum(frequency[seen] * iou[seen]))
  result['pixel_accuracy'] = float(true_positive.sum() / confusion.sum())
  # Foreground (any tissue class) vs background as a binary problem.
  fg_tp = confusion[tissue, tissue].sum()
  fg_fp = confusion[num_tissue_classes:, tissue].sum()
  fg_fn = confusion[tissue, num_tissue_classes:].sum()
  with np.errstate(invalid='ignore', divide='ignore'):
    result['fg_bg_Dice'] = float(2 * fg_tp / (2 * fg_tp + fg_fp + fg_fn))
  return result


def format_metrics_table(metrics: dict) -> str:
  """Fixed-width table: per-class IoU and Dice (%), then the summary figures."""
  names = [key.split('/', 1)[1] for key in metrics if key.startswith('IoU/')]
  pct = lambda value: f'{100 * value:6.2f}' if np.isfinite(value) else '   n/a'
  lines = [f'{"class":<10}{"IoU %":>8}{"Dice %":>8}']
  for name in names:
    lines.append(f'{name:<10}{pct(metrics["IoU/" + name]):>8}{pct(metrics["Dice/" + name]):>8}')
  lines.append('-' * 26)
  for key, label in (('mIoU', 'mIoU'), ('mDice', 'mDice'), ('FwIoU', 'FwIoU'),
                     ('pixel_accuracy', 'pixel acc'), ('fg_bg_Dice', 'fg/bg Dice')):
    lines.append(f'{label:<10}{pct(metrics[key]):>8}')
  return '\n'.join(lines)
