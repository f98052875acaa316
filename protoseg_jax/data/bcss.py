"""BCSS-WSSS folder reader (also LUAD-HistoSeg's spaced labels), palette PNG writing and overlays.

Layout:
  <root>/training/ (or train/)          <name>[1101].png   multi-hot label in the file name, class order
  <root>/val/ (or valid/, validation/)  img/<name>.png + mask/<name>.png (palette or grey, values 0..C)
  <root>/test/                          img/<name>.png + mask/<name>.png
Every user-facing problem raises `DatasetError` whose message names the file or folder.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Optional

import numpy as np
from PIL import Image

BCSS_PALETTE = np.asarray([(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)], np.uint8)
SPLIT_DIRS = {'train': ('training', 'train'), 'val': ('val', 'valid', 'validation'), 'test': ('test',)}
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
_LABEL = re.compile(r'\[([0-9 ]*)\]')


class DatasetError(ValueError):
  """Bad or missing data; the message names the offending file or folder."""


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


def _open(path: str) -> Image.Image:
  try:
    image = Image.open(path)
    image.load()  # decodes fully, so truncated files fail here
    return image
  except FileNotFoundError:
    raise DatasetError(f'{path}: file not found') from None
  except (OSError, SyntaxError, ValueError) as error:
    raise DatasetError(f'{path}: unreadable image ({error})') from None


def read_image(path: str) -> np.ndarray:
  """`[H, W, 3]` uint8 RGB."""
  return np.asarray(_open(path).convert('RGB'))


def read_mask(path: str, num_values: int, palette: Optional[np.ndarray] = None) -> np.ndarray:
  """`[H, W]` uint8 class values from a palette-mode, grey, or palette-coloured RGB PNG."""
  image = _open(path)
  if image.mode == 'P' or image.mode == 'L':
    mask = np.asarray(image)  # palette indices / grey values, not colours
  elif image.mode in ('RGB', 'RGBA'):
    rgb = np.asarray(image.convert('RGB')).astype(np.int32)
    colours = BCSS_PALETTE if palette is None else np.asarray(palette, np.int32)
    codes = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
    lookup = {int(r) * 65536 + int(g) * 256 + int(b): i for i, (r, g, b) in enumerate(colours)}
    unknown = set(np.unique(codes).tolist()) - set(lookup)
    if unknown:
      raise DatasetError(f'{path}: RGB mask has colours outside the palette (e.g. #{min(unknown):06x})')
    mask = np.vectorize(lookup.get, otypes=[np.uint8])(codes)
  else:
    raise DatasetError(f'{path}: mask mode {image.mode!r} is not palette, grey or RGB')
  mask = mask.astype(np.uint8)
  bad = np.unique(mask[mask >= num_values])
  if bad.size:
    raise DatasetError(f'{path}: mask values {bad.tolist()} outside 0..{num_values - 1}')
  return mask


def label_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """`[C]` int32: class c is present iff some pixel equals c (the background value C is ignored)."""
  return np.asarray([(mask == c).any() for c in range(num_classes)], np.int32)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
  """`[H, W]` class values -> `[H, W, 3]` uint8 colours."""
  return np.asarray(palette, np.uint8)[mask]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Blend of the tile `[H, W, 3]` and its coloured mask: `(1 - alpha) * image + alpha * colours`."""
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(mask, palette).astype(np.float32)
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def write_palette_png(path: str, mask: np.ndarray, palette: np.ndarray) -> None:
  """Palette-mode PNG whose indices are the class values (the dataset's own format)."""
  image = Image.fromarray(np.asarray(mask, np.uint8), mode='P')
  flat = np.zeros((256, 3), np.uint8)
  flat[:len(palette)] = np.asarray(palette, np.uint8)
  image.putpalette(flat.flatten().tolist())
  image.save(path)

