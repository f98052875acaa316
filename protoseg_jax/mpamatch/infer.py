"""Whole-image inference (sliding window, summed softmax, segmentation head only), scoring, predict folders."""

from __future__ import annotations

import glob
import math
import os
from typing import Callable, Sequence

import ml_collections
import numpy as np
from PIL import Image

from protoseg_jax import metrics as metrics_lib, ops
from protoseg_jax.data.bcss import IMAGE_EXTENSIONS, DatasetError, overlay, read_image, write_palette_png
from protoseg_jax.mpamatch import data as data_lib


def window_starts(length: int, window: int, stride: int) -> list[int]:
  """Start offsets covering `[0, length)` with windows of `window` every `stride`, the last flush with the
  end (one window at 0 when the image is not longer than the window)."""
  if stride <= 0:
    raise ValueError(f'config.eval.stride must be positive, got {stride}')
  if length <= window:
    return [0]
  starts = list(range(0, length - window + 1, stride))
  if starts[-1] != length - window:
    starts.append(length - window)
  return starts


def sliding_window_probs(probs_fn: Callable, image: np.ndarray, window: int, stride: int,
                         batch_size: int) -> np.ndarray:
  """uint8 `[H, W, 3]` -> mean softmax `[H, W, C]` over the windows covering each pixel.

  `probs_fn(windows uint8 [N, S, S, 3]) -> [N, S, S, C]` is called with N = batch_size always (the last
  call is padded), so it compiles once. Images smaller than the window are zero-padded.
  """
  height, width = image.shape[:2]
  padded_h, padded_w = max(height, window), max(width, window)
  canvas = np.zeros((padded_h, padded_w, 3), np.uint8)
  canvas[:height, :width] = image
  corners = [(y, x) for y in window_starts(padded_h, window, stride) for x in window_starts(padded_w, window, stride)]
  total, counts = None, np.zeros((padded_h, padded_w, 1), np.float32)
  for start in range(0, len(corners), batch_size):
    chunk = corners[start:start + batch_size]
    windows = np.stack([canvas[y:y + window, x:x + window] for y, x in chunk])
    if len(chunk) < batch_size:
      windows = np.concatenate([windows, np.repeat(windows[:1], batch_size - len(chunk), axis=0)])
    probs = np.asarray(probs_fn(windows), np.float32)
    if total is None:
      total = np.zeros((padded_h, padded_w, probs.shape[-1]), np.float32)
    for (y, x), p in zip(chunk, probs):
      total[y:y + window, x:x + window] += p
      counts[y:y + window, x:x + window] += 1.0
  return (total / counts)[:height, :width]


def resize_probs(probs: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
  """Bilinear (align_corners=False) resize of `[H, W, C]` probabilities, e.g. back to the mask's size."""
  if probs.shape[:2] == tuple(out_hw):
    return probs
  rows = ops.bilinear_matrix(probs.shape[0], out_hw[0], False)
  cols = ops.bilinear_matrix(probs.shape[1], out_hw[1], False)
  return np.einsum('oh,hwc,pw->opc', rows, probs, cols).astype(np.float32)


def predict_mask(probs_fn: Callable, image: np.ndarray, out_hw: Sequence[int],
                 config: ml_collections.ConfigDict) -> np.ndarray:
  """`[H, W, 3]` (already resized to `resize_to` if set) -> class ids `[out_h, out_w]` uint8."""
  probs = sliding_window_probs(probs_fn, image, config.data.image_size, config.eval.stride,
                               config.eval.batch_size)
  return np.argmax(resize_probs(probs, out_hw), axis=-1).astype(np.uint8)


def summarize(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
  """Metrics from a `[C, C]` matrix whose class 0 is background.

  `mIoU` / `mDice` average the foreground classes (the foreground IoU / Dice for a binary set);
  `mIoU_all` averages every class including background (the usual semi-supervised segmentation mIoU).
  """
  names = list(class_names)
  order = list(range(1, len(names))) + [0]
  result = metrics_lib.segmentation_metrics(np.asarray(confusion)[np.ix_(order, order)],
                                            [names[i] for i in order], num_tissue_classes=len(names) - 1)
  iou = np.asarray([result[f'IoU/{name}'] for name in names])
  finite = iou[np.isfinite(iou)]
  result['mIoU_all'] = float(finite.mean()) if finite.size else math.nan
  result['confusion_matrix'] = np.asarray(confusion).tolist()
  return result


def evaluate(probs_fn: Callable, images: Sequence[tuple[str, np.ndarray, np.ndarray]],
             config: ml_collections.ConfigDict) -> dict:
  """Dataset-level metrics over `(name, image, mask)` triples, plus the image-wise mean foreground Dice
  (`image_Dice`, binary sets; images with no foreground in either mask and prediction are skipped)."""
  num_classes = len(config.data.class_names)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  image_dice = []
  for _, image, mask in images:
    pred = predict_mask(probs_fn, image, mask.shape, config)
    counts = np.bincount(mask.astype(np.int64).ravel() * num_classes + pred.ravel(),
                         minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    confusion += counts
    if num_classes == 2:
      tp, fp, fn = counts[1, 1], counts[0, 1], counts[1, 0]
      if tp + fp + fn > 0:
        image_dice.append(2 * tp / (2 * tp + fp + fn))
  result = summarize(confusion, config.data.class_names)
  if num_classes == 2:
    result['image_Dice'] = float(np.mean(image_dice)) if image_dice else math.nan
  result['images'] = len(images)
  return result


def load_eval_images(pairs: Sequence[data_lib.Pair], data: ml_collections.ConfigDict):
  """`(name, image resized to resize_to, mask at its original size)` for each pair."""
  out = []
  for pair in pairs:
    image, mask = data_lib.load_pair(pair, data, resize_mask=False)
    out.append((pair.id, image, mask))
  return out


def list_images(input_dir: str) -> list[str]:
  if not input_dir:
    raise DatasetError('config.predict.input_dir is empty: point it at a folder of images')
  if not os.path.isdir(input_dir):
    raise DatasetError(f'predict input folder not found: {input_dir}')
  paths = sorted(p for p in glob.glob(os.path.join(input_dir, '*'))
                 if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
  if not paths:
    raise DatasetError(f'no images (png/jpg/bmp/tif) in {input_dir}')
  return paths


def predict_folder(probs_fn: Callable, config: ml_collections.ConfigDict, input_dir: str,
                   output_dir: str, write: bool = True) -> int:
  """Writes `masks/<stem>.png` (palette PNG, class ids) and `overlays/<stem>.png`; returns the count.

  Multi-host: every process must run the (sharded) predictions; only the one with `write` writes files.
  """
  palette = np.asarray(config.data.palette, np.uint8)
  if len(palette) != len(config.data.class_names):
    raise ValueError(f'config.data.palette has {len(palette)} colours for {len(config.data.class_names)} classes')
  os.makedirs(os.path.join(output_dir, 'masks'), exist_ok=True)
  os.makedirs(os.path.join(output_dir, 'overlays'), exist_ok=True)
  paths = list_images(input_dir)
  for path in paths:
    image = read_image(path)
    mask = predict_mask(probs_fn, data_lib.resize_square(image, config.data.resize_to, nearest=False),
                        image.shape[:2], config)
    if not write:
      continue
    stem = os.path.splitext(os.path.basename(path))[0]
    write_palette_png(os.path.join(output_dir, 'masks', stem + '.png'), mask, palette)
    Image.fromarray(overlay(image, mask, palette, config.predict.overlay_alpha)).save(
        os.path.join(output_dir, 'overlays', stem + '.png'))
  return len(paths)
