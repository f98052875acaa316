"""BCSS-WSSS folder reader (also LUAD-HistoSeg's spaced labels), palette PNG writing and overlays.

Layout:
  <root>/training/ (or train/)          <name>[1101].png   multi-hot label in the file name, class order
  <root>/val/ (or valid/, validation/)  img/<name>.png + mask/<name>.png (palette or grey, values 0..C)
  <root>/test/                          img/<name>.png + mask/<name>.png
Every user-facing problem raises `DatasetError` whose message names the file or folder. Image files are read
by `protoseg_jax.data.images` (its functions are re-exported here).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from protoseg_jax.data.images import (  # noqa: F401  (re-exported: the one place that reads image files)
    BCSS_PALETTE, colorize, label_from_mask, overlay, read_image, read_mask, write_palette_png)
from protoseg_jax.errors import DatasetError  # noqa: F401  (re-exported)

# BCSS-WSSS classes in label order, and its mask palette (TUM, STR, LYM, NEC, BACK).
CLASS_NAMES = ('TUM', 'STR', 'LYM', 'NEC')
BACKGROUND_NAME = 'BACK'
SPLIT_DIRS = {'train': ('training', 'train'), 'val': ('val', 'valid', 'validation'), 'test': ('test',)}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
_LABEL = re.compile(r'\[([0-9 ]*)\]')


def parse_label(filename: str, num_classes: int) -> np.ndarray:
  """Multi-hot `[num_classes]` int32 from the last `[...]` group: `[1101]` or `[1 1 0 1]`."""
  groups = _LABEL.findall(os.path.basename(filename))
  if not groups:
    raise DatasetError(f'{filename}: no image-level label like [1101] in the file name')
  text = groups[-1]
  digits = text.split() if ' ' in text.strip() else list(text.strip())
  if len(digits) != num_classes or any(d not in ('0', '1') for d in digits):
    raise DatasetError(f'{filename}: label [{text}] must be {num_classes} digits 0/1 '
                       f'(one per class in config.data.class_names)')
  return np.asarray([int(d) for d in digits], np.int32)


def find_split_dir(root: str, split: str) -> str:
  if not os.path.isdir(root):
    raise DatasetError(f'dataset folder not found: {root}')
  if split not in SPLIT_DIRS:
    raise DatasetError(f'unknown split {split!r}: expected one of {sorted(SPLIT_DIRS)}')
  for name in SPLIT_DIRS[split]:
    path = os.path.join(root, name)
    if os.path.isdir(path):
      return path
  raise DatasetError(f'{root}: no {split} folder (looked for {", ".join(SPLIT_DIRS[split])})')


def _images_in(folder: str) -> list[str]:
  return sorted(path for path in glob.glob(os.path.join(folder, '*'))
                if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS)


def list_train_tiles(root: str, num_classes: int) -> list[tuple[str, np.ndarray]]:
  """Sorted `(path, label [C])` for every training tile; every file name must carry a valid label."""
  folder = find_split_dir(root, 'train')
  paths = _images_in(folder)
  if not paths:
    raise DatasetError(f'{folder}: no tiles (png/jpg/tif)')
  return [(path, parse_label(path, num_classes)) for path in paths]


def list_eval_tiles(root: str, split: str) -> list[tuple[str, str]]:
  """Sorted `(image_path, mask_path)`; masks are matched to images by file stem."""
  folder = find_split_dir(root, split)
  image_dir, mask_dir = os.path.join(folder, 'img'), os.path.join(folder, 'mask')
  for path in (image_dir, mask_dir):
    if not os.path.isdir(path):
      raise DatasetError(f'{path}: folder missing ({split} needs img/ and mask/)')
  images = _images_in(image_dir)
  if not images:
    raise DatasetError(f'{image_dir}: no tiles (png/jpg/tif)')
  masks = {os.path.splitext(os.path.basename(path))[0]: path for path in _images_in(mask_dir)}
  pairs = []
  for image in images:
    stem = os.path.splitext(os.path.basename(image))[0]
    if stem not in masks:
      raise DatasetError(f'{image}: no mask {stem}.png in {mask_dir}')
    pairs.append((image, masks[stem]))
  return pairs
