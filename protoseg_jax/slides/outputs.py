"""Per-slide outputs: pyramidal palette mask TIFF, GeoJSON polygons (QuPath), overlay thumbnail, summaries.

Every file is written under a temporary name in its folder and renamed into place (`os.replace`), so an
interrupted run never leaves a complete-looking partial file; `summary.json`, written last, marks a slide
as done.

mask.tif: OME-TIFF (BigTIFF when large), uint8 class values, 512 x 512 deflate tiles, a 2x pyramid of
nearest-neighbour levels in SubIFDs (what Bio-Formats, hence QuPath, reads as a pyramid), Photometric
palette with the class colours as the TIFF colormap (OpenSlide renders it in colour; tifffile returns it),
X/YResolution in pixels per centimetre and OME PhysicalSizeX/Y in µm. QuPath (Bio-Formats) shows the class
values as one grey channel: it colours channels from OME metadata, not from a TIFF colormap.

Polygons: marching squares (scikit-image `find_contours` at 0.5 on each class's 0/1 map, zero-padded so
every ring closes, in row strips so memory stays bounded) puts vertices on pixel-edge midpoints; a ring's
orientation tells outer from hole, and each hole goes to the smallest outer ring containing it. Area error
vs the pixel count: -1/8 px per convex and +1/8 px per concave corner (so about 0 along staircases).
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from protoseg_jax.data import bcss


def atomic_write_bytes(path: str, data: bytes) -> None:
  tmp = f'{path}.partial-{os.getpid()}'
  with open(tmp, 'wb') as handle:
    handle.write(data)
  os.replace(tmp, path)


def atomic_write_json(path: str, value) -> None:
  atomic_write_bytes(path, (json.dumps(value, indent=2) + '\n').encode())


def tiff_colormap(palette: np.ndarray) -> np.ndarray:
  """`[K, 3]` uint8 -> `[3, 256]` uint16 TIFF colormap (unused entries black)."""
  cmap = np.zeros((3, 256), np.uint16)
  cmap[:, :len(palette)] = np.asarray(palette, np.uint16).T * 257
  return cmap


def _level_tiles(mask: np.ndarray, step: int, tile: int, fill: int) -> Iterator[np.ndarray]:
  """Row-major `[tile, tile]` tiles of `mask[::step, ::step]`, padded with `fill` at the edges."""
  height, width = -(-mask.shape[0] // step), -(-mask.shape[1] // step)
  for y in range(0, height, tile):
    for x in range(0, width, tile):
      block = np.asarray(mask[y * step:(y + tile) * step:step, x * step:(x + tile) * step:step])
      if block.shape != (tile, tile):
        padded = np.full((tile, tile), fill, np.uint8)
        padded[:block.shape[0], :block.shape[1]] = block
        block = padded
      yield block


def pyramid_steps(shape: tuple[int, int], tile: int) -> list[int]:
  """Downsample factors 1, 2, 4, ... until the level fits in one tile (at least one reduced level)."""
  steps = [1]
  while max(-(-shape[0] // steps[-1]), -(-shape[1] // steps[-1])) > tile or len(steps) < 2:
    steps.append(steps[-1] * 2)
  return steps


def write_mask_tiff(path: str, mask: np.ndarray, palette: np.ndarray, mpp: float, background: int,
                    tile: int = 512, class_names: Sequence[str] = ()) -> None:
  """Writes the `[H, W]` uint8 `mask` (may be a memory map) as a tiled pyramidal palette OME-TIFF."""
  import tifffile
  height, width = mask.shape
  steps = pyramid_steps(mask.shape, tile)
  cmap = tiff_colormap(palette)
  tmp = f'{path}.partial-{os.getpid()}'
  common = dict(dtype=np.uint8, tile=(tile, tile), photometric='palette', colormap=cmap,
                compression='zlib', resolutionunit='CENTIMETER')
  description = '; '.join(f'{value}={name}' for value, name in enumerate(class_names))
  with tifffile.TiffWriter(tmp, bigtiff=height * width > 2 ** 31, ome=True) as writer:
    for index, step in enumerate(steps):
      level_shape = (-(-height // step), -(-width // step))
      per_cm = 1e4 / (mpp * step)
      extra = dict(subifds=len(steps) - 1,
                   metadata={'axes': 'YX', 'PhysicalSizeX': mpp, 'PhysicalSizeXUnit': 'µm',
                             'PhysicalSizeY': mpp, 'PhysicalSizeYUnit': 'µm',
                             'Name': f'class mask ({description})'}) if index == 0 else dict(subfiletype=1)
      writer.write(_level_tiles(mask, step, tile, background), shape=level_shape,
                   resolution=(per_cm, per_cm), **common, **extra)
  os.replace(tmp, path)


def signed_area(ring: np.ndarray) -> float:
  """Shoelace area of a closed `[n, 2]` (x, y) ring: > 0 around foreground (skimage's orientation)."""
  x, y = ring[:, 0], ring[:, 1]
  return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def class_rings(mask: np.ndarray, value: int, strip_px: int = 1 << 20,
                min_area_px: float = 0.0) -> list[np.ndarray]:
  """Closed marching-squares rings `[n, 2]` (x=col, y=row, mask pixel-centre coordinates) of `mask == value`.

  Works on row strips of about `strip_px` pixels (the mask may be a memory map): neighbouring strips
  share one row, so their marching-squares cells are disjoint and cover the image; contours cut by a
  strip border end exactly on that shared row and are chained end to start (skimage orients every
  segment consistently), giving the same rings as one pass over the whole mask. Rings enclosing less than
  `min_area_px` are dropped as soon as they close (specks cost no memory).
  """
  from skimage import measure
  height, width = mask.shape
  step = max(8, strip_px // max(width, 1))
  closed, pieces = [], []
  for top in range(0, height, step):
    bottom = min(top + step + 1, height)                      # one shared row with the next strip
    strip = np.asarray(mask[top:bottom]) == value
    if not strip.any():
      continue
    first, last = top == 0, bottom == height
    strip = np.pad(strip.astype(np.uint8), ((int(first), int(last)), (1, 1)))
    for contour in measure.find_contours(strip, 0.5):
      ring = np.stack([contour[:, 1] - 1.0, contour[:, 0] + (top - int(first))], axis=1)
      if not np.array_equal(ring[0], ring[-1]):
        pieces.append(ring)
      elif len(ring) >= 4 and abs(signed_area(ring)) >= max(min_area_px, 1e-9):
        closed.append(ring)
  # Chain the cut contours: each cut point is the end of one piece and the start of another.
  key = lambda point: (int(round(2 * point[1])), int(round(2 * point[0])))
  starts = {key(piece[0]): index for index, piece in enumerate(pieces)}
  used = [False] * len(pieces)
  for index, piece in enumerate(pieces):
    if used[index]:
      continue
    used[index] = True
    parts, end = [piece], key(piece[-1])
    while end != key(piece[0]):
      nxt = starts[end]
      used[nxt] = True
      parts.append(pieces[nxt][1:])
      end = key(pieces[nxt][-1])
    ring = np.concatenate(parts)
    if abs(signed_area(ring)) >= max(min_area_px, 1e-9):
      closed.append(ring)
  return closed


def class_polygons(mask: np.ndarray, value: int, min_area_px: float, simplify_px: float,
                   strip_px: int = 1 << 20):
  """Shapely Polygons (holes kept) of `mask == value`, in mask pixel-centre coordinates (x=col, y=row).

  Outer rings and holes smaller than `min_area_px` (in mask pixels) are dropped (holes: filled).
  """
  import shapely
  outers, holes = [], []
  for ring in class_rings(mask, value, strip_px, min_area_px):
    (outers if signed_area(ring) > 0 else holes).append(ring)
  if not outers:
    return []
  ring_index = np.repeat(np.arange(len(outers)), [len(ring) for ring in outers])
  shells = list(shapely.polygons(shapely.linearrings(np.concatenate(outers), indices=ring_index)))
  children: list[list[np.ndarray]] = [[] for _ in shells]
  if holes:
    tree = shapely.STRtree(shells)
    points = shapely.points([hole[0] for hole in holes])
    hole_index, shell_index = tree.query(points, predicate='within')
    areas = shapely.area(np.asarray(shells, dtype=object))
    best: dict[int, int] = {}
    for h, s in zip(hole_index.tolist(), shell_index.tolist()):
      if h not in best or areas[s] < areas[best[h]]:
        best[h] = s
    for h, s in best.items():
      children[s].append(holes[h])
  polygons = []
  for shell, inner in zip(shells, children):
    polygon = shapely.Polygon(shell.exterior.coords, inner)
    if simplify_px > 0:
      polygon = shapely.simplify(polygon, simplify_px, preserve_topology=True)
    if not polygon.is_empty and polygon.area >= min_area_px:
      polygons.append(polygon)
  return polygons


def geojson_features(mask: np.ndarray, class_names: Sequence[str], palette: np.ndarray, background: int,
                     level0_per_mask_px: float, min_area_px: float, simplify_px: float) -> list[dict]:
  """One QuPath annotation feature per non-background class present: MultiPolygon in level-0 pixels."""
  import shapely
  from shapely.geometry import mapping
  from shapely.geometry.polygon import orient
  features = []
  scale = level0_per_mask_px
  for value, name in enumerate(class_names):
    if value == background:
      continue
    polygons = class_polygons(mask, value, min_area_px, simplify_px)
    if not polygons:
      continue
    # Mask pixel-centre coordinates -> level-0 pixels (pixel u spans [u, u + 1) x scale).
    polygons = [orient(shapely.transform(p, lambda xy: (xy + 0.5) * scale), 1.0) for p in polygons]
    color = [int(c) for c in palette[value]]
    features.append({
        'type': 'Feature',
        'geometry': mapping(shapely.MultiPolygon(polygons)),
        'properties': {'objectType': 'annotation', 'name': name,
                       'classification': {'name': name, 'color': color}, 'isLocked': False},
    })
  return features


def write_geojson(path: str, features: list[dict]) -> None:
  atomic_write_bytes(path, json.dumps({'type': 'FeatureCollection', 'features': features}).encode())


def overlay_image(thumbnail: np.ndarray, mask_small: np.ndarray, palette: np.ndarray, background: int,
                  class_names: Sequence[str], alpha: float,
                  areas_mm2: Sequence[float] | None = None) -> Image.Image:
  """Thumbnail `[h, w, 3]` with the coloured mask `[h, w]` blended over tissue, and a legend on the right.

  The blend `(1 - alpha) x image + alpha x colour` (background pixels untouched) runs in bands of rows, in
  integers (1/256 steps), so a 2048 x 2048 overlay needs a few MB, not float copies of the whole image.
  """
  colours = bcss.colorize(np.arange(len(palette)), palette).astype(np.uint16)     # [K, 3]
  weight = int(round(alpha * 256))
  blended = np.array(thumbnail, np.uint8, copy=True)
  for top in range(0, blended.shape[0], 256):
    rows = slice(top, top + 256)
    image = blended[rows].astype(np.uint16)
    mix = ((256 - weight) * image + weight * colours[mask_small[rows]] + 128) >> 8
    keep = (mask_small[rows] == background)[..., None]
    blended[rows] = np.where(keep, image, mix).astype(np.uint8)
  height, width = blended.shape[:2]
  try:
    font = ImageFont.load_default(size=max(12, min(28, height // 30)))
  except TypeError:   # Pillow < 10.1: a fixed bitmap font
    font = ImageFont.load_default()
  size = int(getattr(font, 'size', 11))
  line = int(size * 1.6)
  labels = [name if areas_mm2 is None else f'{name}  {areas_mm2[v]:.3f} mm^2'
            for v, name in enumerate(class_names)]
  legend_w = int(max(font.getlength(text) for text in labels) + 3 * line)
  canvas = Image.new('RGB', (width + legend_w, max(height, line * (len(labels) + 1))), (255, 255, 255))
  canvas.paste(Image.fromarray(blended), (0, 0))
  draw = ImageDraw.Draw(canvas)
  for value, text in enumerate(labels):
    top = line // 2 + value * line
    box = (width + line // 2, top, width + line // 2 + size, top + size)
    draw.rectangle(box, fill=tuple(int(c) for c in palette[value]), outline=(0, 0, 0))
    draw.text((width + line // 2 + size + line // 3, top - size // 8), text, fill=(0, 0, 0), font=font)
  return canvas


def write_png(path: str, image: Image.Image) -> None:
  tmp = f'{path}.partial-{os.getpid()}'
  image.save(tmp, format='PNG')
  os.replace(tmp, path)


CSV_FIELDS = ('slide', 'path', 'slide_mpp', 'mpp_source', 'model_mpp', 'level', 'level_mpp', 'mask_mpp',
              'tiles', 'tiles_total', 'seconds', 'tiles_per_s', 'input_wait_fraction', 'tissue_mm2')


def write_summary_csv(out_root: str) -> str:
  """Rebuilds `out_root/summary.csv` from every complete `out_root/*/summary.json`; -> its path."""
  rows, class_columns = [], []
  for name in sorted(os.listdir(out_root)) if os.path.isdir(out_root) else []:
    path = os.path.join(out_root, name, 'summary.json')
    if not os.path.isfile(path):
      continue
    with open(path) as handle:
      summary = json.load(handle)
    row = {key: summary.get(key) for key in CSV_FIELDS}
    for entry in summary.get('classes', []):
      for key, value in ((f'{entry["name"]}_mm2', entry['area_mm2']),
                         (f'{entry["name"]}_share', entry['tissue_share'])):
        row[key] = value
        if key not in class_columns:
          class_columns.append(key)
    rows.append(row)
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=list(CSV_FIELDS) + class_columns, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  target = os.path.join(out_root, 'summary.csv')
  os.makedirs(out_root, exist_ok=True)
  atomic_write_bytes(target, buffer.getvalue().encode())
  return target
