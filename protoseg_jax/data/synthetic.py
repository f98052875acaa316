"""A procedurally drawn H&E-like tissue set with exact masks, written in the BCSS-WSSS folder layout.

Each tile is a random partition (a warped Voronoi diagram of a few seeds) into regions of the five BCSS
values, each drawn with its own texture and colour statistics:
  0 tumour       dense clusters of large purple nuclei on purple-pink cytoplasm
  1 stroma       pink fibrous streaks with sparse elongated nuclei
  2 lymphocytes  many small, dark, round nuclei packed on light pink
  3 necrosis     pale pink-grey background with small fragmented debris
  4 background   near-white
A per-tile stain jitter keeps single mean colours from separating the classes on their own.
Deterministic: tile i of a split depends only on (seed, split, i).

  python -m protoseg_jax.data.synthetic --out=/tmp/synthetic_bcss --num_train=768 --num_val=64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
from PIL import Image
from scipy import ndimage

from protoseg_jax.data.bcss import BCSS_PALETTE, DatasetError, write_palette_png

NUM_TISSUE_CLASSES = 4
BACKGROUND = 4
# Probability that a region is of class 0..4 (background is a minority).
REGION_CLASS_PROBS = (0.24, 0.24, 0.22, 0.2, 0.1)
SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """`[size, size]` noise in ~[-1, 1], smooth at the scale of size / cells."""
  coarse = rng.normal(size=(cells, cells)).astype(np.float32)
  return np.asarray(Image.fromarray(coarse, mode='F').resize((size, size), Image.BICUBIC))


def _stamp_nuclei(rng: np.random.Generator, size: int, count: int, radius: float,
                  elongation: float = 1.0, centres=None) -> np.ndarray:
  """`[size, size]` float coverage of `count` elliptical nuclei (soft edges)."""
  if centres is None:
    centres = rng.uniform(0, size, (count, 2))
  impulses = np.zeros((size, size), np.float32)
  ys, xs = np.clip(centres.astype(int), 0, size - 1).T
  impulses[ys, xs] = 1.0
  r = int(np.ceil(radius * elongation))
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
  angle = rng.uniform(0, np.pi)
  u = xx * np.cos(angle) + yy * np.sin(angle)
  v = -xx * np.sin(angle) + yy * np.cos(angle)
  footprint = (u / (radius * elongation)) ** 2 + (v / radius) ** 2 <= 1.0
  covered = ndimage.maximum_filter(impulses, footprint=footprint).astype(np.float32)
  return ndimage.gaussian_filter(covered, 0.7)


def _colour(base, field: np.ndarray) -> np.ndarray:
  return np.asarray(base, np.float32)[None, None] * np.ones_like(field)[..., None]


def _texture(rng: np.random.Generator, value: int, size: int) -> np.ndarray:
  """`[size, size, 3]` float RGB in ~[0, 1] for one class over the whole tile."""
  grain = 0.04 * _smooth_noise(rng, size, size // 6)[..., None]
  if value == BACKGROUND:
    return _colour((0.94, 0.92, 0.95), grain[..., 0]) + 0.3 * grain
  if value == 0:  # tumour: clustered large nuclei
    clusters = rng.uniform(0, size, (6, 2))
    centres = clusters[rng.integers(0, 6, 260)] + rng.normal(0, size / 12, (260, 2))
    nuclei = _stamp_nuclei(rng, size, 260, rng.uniform(4.0, 5.5), 1.2, centres=centres)
    base = _colour((0.78, 0.52, 0.76), grain[..., 0]) + grain
    return base * (1 - nuclei[..., None]) + _colour((0.33, 0.14, 0.50), nuclei) * nuclei[..., None]
  if value == 1:  # stroma: oriented fibres + sparse spindle nuclei
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    phase = 6.0 * _smooth_noise(rng, size, 5)
    fibres = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(0.35, 0.6) + phase)
    nuclei = _stamp_nuclei(rng, size, 25, 1.8, elongation=3.0)
    base = (_colour((0.96, 0.66, 0.78), fibres) * (0.75 + 0.25 * fibres[..., None])
            + _colour((0.90, 0.80, 0.88), fibres) * (0.25 - 0.25 * fibres[..., None])) + grain
    return base * (1 - nuclei[..., None]) + _colour((0.42, 0.18, 0.52), nuclei) * nuclei[..., None]
  if value == 2:  # lymphocytes: dense small dark round nuclei
    nuclei = _stamp_nuclei(rng, size, 650, rng.uniform(2.0, 2.8))
    base = _colour((0.90, 0.72, 0.84), grain[..., 0]) + grain
    return base * (1 - nuclei[..., None]) + _colour((0.20, 0.08, 0.36), nuclei) * nuclei[..., None]
  if value == 3:  # necrosis: pale, fragmented debris
    fragments = _smooth_noise(rng, size, size // 3)
    debris = ndimage.gaussian_filter((fragments > 1.1).astype(np.float32), 0.6)
    dust = _stamp_nuclei(rng, size, 90, 1.0)
    base = _colour((0.86, 0.76, 0.82), grain[..., 0]) + grain
    stain = np.clip(debris + 0.8 * dust, 0, 1)[..., None]
    return base * (1 - stain) + _colour((0.62, 0.44, 0.62), stain[..., 0]) * stain
  raise ValueError(f'unknown class value {value}')


def _layout(rng: np.random.Generator, size: int) -> np.ndarray:
  """`[size, size]` uint8 region classes: a warped Voronoi partition of 2-5 seeds."""
  seeds = rng.uniform(0, size, (rng.integers(2, 6), 2))
  values = rng.choice(len(REGION_CLASS_PROBS), len(seeds), p=REGION_CLASS_PROBS)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  warp = size / 10
  yy = yy + warp * _smooth_noise(rng, size, 4)
  xx = xx + warp * _smooth_noise(rng, size, 4)
  distance = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
  return values[np.argmin(distance, axis=0)].astype(np.uint8)


def render_tile(rng: np.random.Generator, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
  """-> (image `[size, size, 3]` uint8, mask `[size, size]` uint8 in 0..4)."""
  mask = _layout(rng, size)
  image = np.zeros((size, size, 3), np.float32)
  for value in np.unique(mask):
    region = mask == value
    image[region] = _texture(rng, int(value), size)[region]
  stain = 1.0 + rng.normal(0, 0.05, 3)  # per-tile stain variation
  image = image * stain[None, None] + rng.normal(0, 0.03)
  image = image + rng.normal(0, 0.015, image.shape)
  return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def _tile_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))


def _label_text(mask: np.ndarray) -> str:
  return ''.join('1' if (mask == c).any() else '0' for c in range(NUM_TISSUE_CLASSES))


def existing_set(root: str, params: dict) -> bool:
  """Whether `root` already holds the synthetic set of `params` (its `synthetic.json`); False when `root`
  is absent or empty; a folder holding anything else is refused in one line."""
  if not (os.path.exists(root) and os.listdir(root)):
    return False
  manifest = os.path.join(root, 'synthetic.json')
  if os.path.isfile(manifest):
    with open(manifest) as handle:
      if json.load(handle) == params:
        return True
  raise DatasetError(f'{root} already holds other data (a different synthetic set or a real one); '
                     f'choose an empty folder or set config.data.root')


def fresh_partial(root: str) -> str:
  """An empty `<root>.partial` folder path to write a set into (left-overs of a killed run removed)."""
  partial = root.rstrip('/') + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  return partial


def publish_set(partial: str, root: str, params: dict) -> str:
  """Writes the manifest into `partial` and moves it to `root` in one rename (`root` absent or empty)."""
  with open(os.path.join(partial, 'synthetic.json'), 'w') as handle:
    json.dump(params, handle)
  if os.path.exists(root):
    os.rmdir(root)  # empty (checked by `existing_set`)
  os.replace(partial, root)
  return root


def write_bcss_layout(root: str, num_train: int, num_val: int, num_test: int, size: int = 224,
                      seed: int = 0) -> str:
  """Writes the set under `root` once; an identical existing set is reused, anything else is refused."""
  params = {'generator': 'protoseg_jax.synthetic/1', 'num_train': num_train, 'num_val': num_val,
            'num_test': num_test, 'size': size, 'seed': seed}
  if existing_set(root, params):
    return root
  partial = fresh_partial(root)
  os.makedirs(os.path.join(partial, 'training'))
  for index in range(num_train):
    rng = _tile_rng(seed, 'train', index)
    image, mask = render_tile(rng, size)
    while not (mask < BACKGROUND).any():  # a training tile needs at least one tissue class
      image, mask = render_tile(rng, size)
    Image.fromarray(image).save(os.path.join(partial, 'training', f'synth_{index:05d}+0[{_label_text(mask)}].png'))
  for split, count in (('val', num_val), ('test', num_test)):
    os.makedirs(os.path.join(partial, split, 'img'))
    os.makedirs(os.path.join(partial, split, 'mask'))
    for index in range(count):
      image, mask = render_tile(_tile_rng(seed, split, index), size)
      name = f'synth_{split}_{index:05d}.png'
      Image.fromarray(image).save(os.path.join(partial, split, 'img', name))
      write_palette_png(os.path.join(partial, split, 'mask', name), mask, BCSS_PALETTE)
  return publish_set(partial, root, params)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True)
  parser.add_argument('--num_train', type=int, default=768)
  parser.add_argument('--num_val', type=int, default=64)
  parser.add_argument('--num_test', type=int, default=64)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  write_bcss_layout(args.out, args.num_train, args.num_val, args.num_test, args.size, args.seed)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
