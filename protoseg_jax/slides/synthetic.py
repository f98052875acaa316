"""Synthetic pyramidal slides with a known layout (tests, bench, demo).

A layout `[h, w]` uint8 of class values (`GLASS_VALUE` = glass) is painted at `cell_px` level-0 pixels per
layout cell, with flat class colours (exact class maps for stub models) or H&E-like textures from
`protoseg_jax.data.synthetic`, into a tiled pyramidal TIFF (JPEG or deflate tiles, 2x levels) whose µm/px
is stated as TIFF resolution tags, an Aperio `MPP =` description (SVS layout), OME `PhysicalSizeX`, or not
at all. Tiles are rendered one at a time (never a whole level in memory).

  python -m protoseg_jax.slides.synthetic --out=/tmp/demo_slide.tif --size=8192 --mpp=0.5
"""

from __future__ import annotations

import argparse
import math
from typing import Iterator, Optional, Sequence

import numpy as np

GLASS_VALUE = 255
GLASS_RGB = (243, 242, 240)
# Flat colours of the test classes: far apart in RGB so nearest-colour decoding survives JPEG.
FLAT_COLOURS = np.asarray([(200, 40, 60), (60, 170, 70), (50, 60, 190), (150, 60, 200), (230, 200, 40)],
                          np.uint8)


def _texture_bank(values: Sequence[int], tile: int, variants: int, seed: int) -> dict[int, list[np.ndarray]]:
  """`variants` H&E-like `[tile, tile, 3]` uint8 textures per class value (BCSS tissue values 0..3)."""
  from protoseg_jax.data import synthetic as tiles
  bank = {}
  for value in values:
    rng = np.random.default_rng([seed, value])
    bank[value] = [(np.clip(tiles._texture(rng, int(value) % tiles.NUM_TISSUE_CLASSES, tile), 0, 1) * 255)
                   .round().astype(np.uint8) for _ in range(variants)]
  return bank


def _render_tile(layout: np.ndarray, cell_px: float, downsample: float, x0: int, y0: int, tile: int,
                 colours: np.ndarray, bank: Optional[dict], rng_key: int) -> np.ndarray:
  """One `[tile, tile, 3]` tile at level pixel (x0, y0) of a level `downsample` x coarser than level 0."""
  ys = ((y0 + np.arange(tile) + 0.5) * downsample / cell_px).astype(np.int64)
  xs = ((x0 + np.arange(tile) + 0.5) * downsample / cell_px).astype(np.int64)
  inside_y, inside_x = ys < layout.shape[0], xs < layout.shape[1]
  values = np.full((tile, tile), GLASS_VALUE, np.uint8)
  values[np.ix_(inside_y, inside_x)] = layout[np.ix_(ys[inside_y], xs[inside_x])]
  out = np.empty((tile, tile, 3), np.uint8)
  out[:] = GLASS_RGB
  for value in np.unique(values):
    if value == GLASS_VALUE:
      continue
    region = values == value
    if bank is None:
      out[region] = colours[value]
    else:
      variants = bank[int(value)]
      out[region] = variants[(rng_key + int(value)) % len(variants)][region]
  return out


def _level_tiles(layout, cell_px, downsample, shape, tile, colours, bank) -> Iterator[np.ndarray]:
  height, width = shape
  for row in range(math.ceil(height / tile)):
    for col in range(math.ceil(width / tile)):
      yield _render_tile(layout, cell_px, downsample, col * tile, row * tile, tile, colours, bank,
                         row * 7919 + col * 104729)


def write_synthetic_slide(path: str, layout: np.ndarray, level0_mpp: float, levels: int = 3, tile: int = 256,
                          jpeg: bool = True, *, cell_px: float = 1.0, texture: str = 'flat',
                          colours: Optional[np.ndarray] = None, mpp_tags: str = 'resolution',
                          jpeg_quality: int = 90, seed: int = 0, variants: int = 4) -> list[tuple[int, int]]:
  """Writes the slide; -> the `(width, height)` of every level.

  Args:
    path: output file (`.tif`, `.svs`, `.ome.tif`).
    layout: `[h, w]` uint8 class values; `GLASS_VALUE` (255) is glass.
    level0_mpp: µm/px of level 0; level k is 2^k coarser.
    levels: number of pyramid levels (>= 1).
    tile: TIFF tile size.
    jpeg: JPEG tiles (`jpeg_quality`) if True, else deflate (lossless).
    cell_px: level-0 pixels per layout cell.
    texture: 'flat' (`colours[value]`) or 'he' (textures of `protoseg_jax.data.synthetic`).
    colours: `[K, 3]` uint8 flat colours (default `FLAT_COLOURS`).
    mpp_tags: 'resolution' (X/YResolution per cm), 'aperio' (SVS layout and `MPP =`), 'ome' (OME-TIFF with
      SubIFD levels, PhysicalSizeX) or 'none' (no resolution at all).
  """
  import tifffile
  layout = np.asarray(layout, np.uint8)
  colours = FLAT_COLOURS if colours is None else np.asarray(colours, np.uint8)
  bank = None
  if texture == 'he':
    bank = _texture_bank([int(v) for v in np.unique(layout) if v != GLASS_VALUE], tile, variants, seed)
  elif texture != 'flat':
    raise ValueError(f"texture must be 'flat' or 'he', got {texture!r}")
  width0, height0 = int(round(layout.shape[1] * cell_px)), int(round(layout.shape[0] * cell_px))
  sizes = [(max(1, math.ceil(width0 / 2 ** k)), max(1, math.ceil(height0 / 2 ** k))) for k in range(levels)]
  compression = ('jpeg', {'level': jpeg_quality}) if jpeg else ('zlib', None)
  common = dict(dtype=np.uint8, tile=(tile, tile), photometric='rgb', compression=compression[0],
                compressionargs=compression[1])

  def level_data(k):
    width, height = sizes[k]
    return _level_tiles(layout, cell_px, width0 / width, (height, width), tile, colours, bank)

  def resolution(k):
    if mpp_tags == 'none':
      return dict(resolution=(1, 1), resolutionunit='NONE')
    per_cm = 1e4 / (level0_mpp * width0 / sizes[k][0])
    return dict(resolution=(per_cm, per_cm), resolutionunit='CENTIMETER')

  bigtiff = width0 * height0 * 3 > 2 ** 31
  if mpp_tags == 'ome':
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=True) as writer:
      for k in range(levels):
        extra = (dict(subifds=levels - 1, metadata={'axes': 'YXS', 'PhysicalSizeX': level0_mpp,
                                                    'PhysicalSizeY': level0_mpp, 'PhysicalSizeXUnit': 'µm',
                                                    'PhysicalSizeYUnit': 'µm'})
                 if k == 0 else dict(subfiletype=1))
        writer.write(level_data(k), shape=(sizes[k][1], sizes[k][0], 3), **common, **extra)
    return sizes
  with tifffile.TiffWriter(path, bigtiff=bigtiff) as writer:
    for k in range(levels):
      if mpp_tags == 'aperio':
        description = (f'Aperio Image Library v12.0.0\r\n{width0}x{height0} ({tile}x{tile}) '
                       f'{"JPEG" if jpeg else "Deflate"}/RGB|AppMag = {10 / level0_mpp:g}'
                       f'|MPP = {level0_mpp:.6f}'
                       if k == 0 else f'Aperio Image Library v12.0.0\r\n{sizes[k][0]}x{sizes[k][1]}')
        writer.write(level_data(k), shape=(sizes[k][1], sizes[k][0], 3), description=description,
                     metadata=None, resolution=(1, 1), resolutionunit='NONE', **common)
        if k == 0:  # SVS: page 1 is a small stripped thumbnail
          thumb_w = max(1, sizes[-1][0] // 2)
          thumb_h = max(1, sizes[-1][1] // 2)
          thumb = _render_tile(layout, cell_px, width0 / thumb_w, 0, 0, max(thumb_w, thumb_h), colours,
                               None, 0)
          writer.write(thumb[:thumb_h, :thumb_w], photometric='rgb', description=description, metadata=None)
      else:
        writer.write(level_data(k), shape=(sizes[k][1], sizes[k][0], 3), subfiletype=0 if k == 0 else 1,
                     metadata=None, **common, **resolution(k))
  return sizes


def demo_layout(cells: int = 64, seed: int = 0) -> np.ndarray:
  """A `[cells, cells]` layout: two tissue blobs of warped Voronoi regions (values 0..3) on glass."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:cells, 0:cells] / cells
  blob = ((xx - 0.35) / 0.28) ** 2 + ((yy - 0.45) / 0.36) ** 2 < 1
  blob |= ((xx - 0.75) / 0.18) ** 2 + ((yy - 0.6) / 0.25) ** 2 < 1
  seeds = rng.uniform(0, 1, (9, 2))
  values = rng.integers(0, 4, len(seeds))
  distance = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
  nearest = np.argmin(distance, axis=0)
  return np.where(blob, values[nearest], GLASS_VALUE).astype(np.uint8)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--size', type=int, default=8192, help='level-0 width and height in pixels')
  parser.add_argument('--mpp', type=float, default=0.5, help='level-0 µm/px')
  parser.add_argument('--levels', type=int, default=4)
  parser.add_argument('--texture', default='he', choices=('he', 'flat'))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  layout = demo_layout(64, args.seed)
  sizes = write_synthetic_slide(args.out, layout, args.mpp, args.levels, cell_px=args.size / 64,
                                texture=args.texture, seed=args.seed)
  print(f'wrote {args.out}: levels {sizes} at {args.mpp} µm/px (level 0)')


if __name__ == '__main__':
  main()
