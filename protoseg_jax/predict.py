"""Masks for a folder of tiles: palette PNGs (the dataset's own palette) and colour overlays.

Label gating needs an image-level label: a tile whose file name carries one (`...[1101].png`) is gated by
it, any other tile by "every class may be present".
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from protoseg_jax import train
from protoseg_jax.data import bcss

TILE_PATTERNS = ('*.png', '*.PNG', '*.jpg', '*.jpeg', '*.JPG', '*.tif', '*.tiff')


def list_tiles(input_dir: str) -> list[str]:
  if not input_dir:
    raise bcss.DatasetError('config.predict.input_dir is empty: point it at a folder of tiles')
  if not os.path.isdir(input_dir):
    raise bcss.DatasetError(f'predict input folder not found: {input_dir}')
  paths = sorted({path for pattern in TILE_PATTERNS for path in glob.glob(os.path.join(input_dir, pattern))})
  if not paths:
    raise bcss.DatasetError(f'no tiles (png/jpg/tif) in {input_dir}')
  return paths


def tile_label(path: str, num_classes: int) -> np.ndarray:
  """The label in the file name if it has one, else all ones (no gating)."""
  try:
    return bcss.parse_label(os.path.basename(path), num_classes)
  except bcss.DatasetError:
    return np.ones((num_classes,), np.int32)


def predict_folder(config: ml_collections.ConfigDict, model, params: dict, prompt_ids: np.ndarray,
                   input_dir: str, output_dir: str) -> int:
  """Writes `masks/<stem>.png` (palette) and `overlays/<stem>.png` for every tile; returns the count."""
  paths = list_tiles(input_dir)
  num_classes = model.config.num_classes
  palette = np.asarray(config.data.palette, np.uint8)
  mask_fn = jax.jit(train.make_mask_fn(model, config))
  bank = train.make_bank_fn(model, prompt_ids)(params)
  os.makedirs(os.path.join(output_dir, 'masks'), exist_ok=True)
  os.makedirs(os.path.join(output_dir, 'overlays'), exist_ok=True)
  batch_size = config.eval.batch_size
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    images = [bcss.read_image(path) for path in chunk]
    for image, path in zip(images, chunk):
      if image.shape[:2] != (config.data.image_size, config.data.image_size):
        raise bcss.DatasetError(f'{path}: tile is {image.shape[1]}x{image.shape[0]}, expected '
                                f'{config.data.image_size}x{config.data.image_size}')
    labels = np.stack([tile_label(path, num_classes) for path in chunk])
    padding = batch_size - len(chunk)  # fixed batch shape: one compilation for the whole folder
    batch_images = np.stack(images + [images[0]] * padding)
    batch_labels = np.concatenate([labels, np.repeat(labels[:1], padding, axis=0)])
    masks = np.asarray(mask_fn(params, bank, jnp.asarray(batch_images), jnp.asarray(batch_labels)))
    for path, image, mask in zip(chunk, images, masks[:len(chunk)]):
      stem = os.path.splitext(os.path.basename(path))[0]
      mask = mask.astype(np.uint8)
      bcss.write_palette_png(os.path.join(output_dir, 'masks', stem + '.png'), mask, palette)
      overlay = bcss.overlay(image, mask, palette, alpha=config.predict.overlay_alpha)
      Image.fromarray(overlay).save(os.path.join(output_dir, 'overlays', stem + '.png'))
  return len(paths)
