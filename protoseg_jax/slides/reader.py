"""Whole-slide readers: pyramid levels, µm/px, and region reads that decode only the tiles they touch.

Two backends behind one small interface (`Slide`):

* `tifffile` (+ `imagecodecs` for JPEG / JPEG 2000 / LZW / ...; the `slides` extra): Aperio `.svs`, generic
  pyramidal TIFF, OME-TIFF (SubIFD pyramids), and other TIFF-family files. A region read seeks, decodes and
  crops only the tiles (or strips) that intersect it, through tifffile's `TiffPage.decode`; a level is
  never loaded whole. Threads share one parsed file: the seek + read of a tile's bytes is locked, the
  decoding (imagecodecs releases the GIL) runs in parallel; decoded tiles sit in a small LRU cache
  (`cache_mb`), since overlapping model tiles read the same slide tiles.
* OpenSlide (`openslide-python` + `openslide-bin`; the `openslide` extra) for what only it reads:
  `.ndpi`, `.mrxs`, `.scn`, `.vms`, `.vmu`, `.bif`, `.svslide`, `.dcm`.

µm/px of level 0 comes from the file: Aperio `MPP = ` in the ImageDescription, OME `PhysicalSizeX`, or TIFF
X/YResolution with a centimetre or inch unit (values outside 0.01..50 µm/px, e.g. a 72-dpi default, are
not a microscope's and are ignored); `slide_mpp` (> 0) is used when the file has none, and a slide with
neither is refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import threading
import xml.etree.ElementTree as ElementTree
from typing import Optional

import numpy as np
from PIL import Image

from protoseg_jax.errors import DatasetError

OPENSLIDE_EXTENSIONS = ('.ndpi', '.mrxs', '.scn', '.vms', '.vmu', '.bif', '.svslide', '.dcm')
TIFF_EXTENSIONS = ('.svs', '.tif', '.tiff', '.btf', '.tf8', '.qptiff')
SLIDE_EXTENSIONS = TIFF_EXTENSIONS + OPENSLIDE_EXTENSIONS
GLASS = 255                     # value of pixels outside the image (white glass)
_MPP_RANGE = (0.01, 50.0)       # a plausible microscope µm/px
_APERIO_MPP = re.compile(r'\|\s*MPP\s*=\s*([0-9.eE+-]+)')
_UNIT_UM = {'m': 1e6, 'cm': 1e4, 'mm': 1e3, 'µm': 1.0, 'um': 1.0, 'nm': 1e-3, 'Å': 1e-4, 'pm': 1e-6}


def slides_extra_error(path: str, what: str, extra: str = 'slides') -> DatasetError:
  return DatasetError(f"{path}: {what} needs the '{extra}' extra: pip install 'protoseg_jax[{extra}]'")


@dataclasses.dataclass(frozen=True)
class Level:
  width: int
  height: int
  downsample: float     # level-0 pixels per pixel of this level
  mpp: float            # µm/px


class Slide:
  """A pyramidal slide: `levels` (finest first), `mpp` (level 0), `read_region`. Thread-safe reads."""

  path: str
  levels: list[Level]
  mpp: float
  mpp_source: str
  backend: str

  def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
    """`[height, width, 3]` uint8 RGB of `level` at level pixel `(x, y)`; outside the image is glass white."""
    raise NotImplementedError

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _levels(sizes: list[tuple[int, int]], mpp: float) -> list[Level]:
  width0, height0 = sizes[0]
  levels = []
  for width, height in sizes:
    downsample = 0.5 * (width0 / width + height0 / height)
    levels.append(Level(int(width), int(height), downsample, mpp * downsample))
  return levels


def _plausible(mpp: Optional[float]) -> Optional[float]:
  if mpp is None or not math.isfinite(mpp) or not _MPP_RANGE[0] <= mpp <= _MPP_RANGE[1]:
    return None
  return float(mpp)


def _ome_mpp(xml: str) -> Optional[float]:
  try:
    root = ElementTree.fromstring(xml)
  except ElementTree.ParseError:
    return None
  for element in root.iter():
    if element.tag.endswith('}Pixels') or element.tag == 'Pixels':
      size = element.get('PhysicalSizeX')
      if size is None:
        return None
      return float(size) * _UNIT_UM.get(element.get('PhysicalSizeXUnit', 'µm'), float('nan'))
  return None


def _tiff_mpp(tiff, page) -> tuple[Optional[float], str]:
  """(µm/px of `page` from the file, where it came from)."""
  description = page.description or ''
  match = _APERIO_MPP.search(description) if description.startswith('Aperio') else None
  if match:
    return _plausible(float(match.group(1))), 'aperio'
  if tiff.is_ome and tiff.ome_metadata:
    mpp = _plausible(_ome_mpp(tiff.ome_metadata))
    if mpp:
      return mpp, 'ome'
  unit = int(page.resolutionunit)
  xres = page.resolution[0] if page.resolution else 0.0
  if xres > 0 and unit in (2, 3):  # RESUNIT.INCH, RESUNIT.CENTIMETER
    mpp = (25400.0 if unit == 2 else 1e4) / xres
    return _plausible(mpp), 'tiff-resolution'
  return None, ''


class TiffSlide(Slide):
  """tifffile backend. Region reads decode only the intersecting tiles/strips of one level's page."""

  backend = 'tifffile'

  def __init__(self, path: str, slide_mpp: float = 0.0, cache_mb: float = 64.0):
    try:
      import tifffile
    except ImportError as error:
      raise slides_extra_error(path, 'reading TIFF slides') from error
    self.path = path
    self._io_lock = threading.Lock()
    try:
      tiff = tifffile.TiffFile(path)
    except Exception as error:  # tifffile raises TiffFileError, ValueError, struct.error...
      raise DatasetError(f'{path}: not a readable TIFF slide ({type(error).__name__}: {error})') from error
    self._tiff = tiff
    try:
      pages = self._level_pages(tiff)
      sizes = []
      for page in pages:
        if page.planarconfig != 1 and page.samplesperpixel > 1:
          raise DatasetError(f'{path}: planar (separate) RGB pages are not supported')
        if page.dtype != np.uint8 or page.samplesperpixel not in (3, 4):
          raise DatasetError(f'{path}: not an 8-bit RGB slide ({page.samplesperpixel} samples of '
                             f'{page.dtype})')
        sizes.append((page.imagewidth, page.imagelength))
      mpp, source = _tiff_mpp(tiff, pages[0])
      if page_compression_needs_codecs(pages[0]):
        try:
          import imagecodecs  # noqa: F401
        except ImportError as error:
          raise slides_extra_error(path, f'decoding {pages[0].compression.name} tiles') from error
    except DatasetError:
      tiff.close()
      raise
    except Exception as error:
      tiff.close()
      raise DatasetError(f'{path}: unreadable TIFF structure ({type(error).__name__}: {error})') from error
    if mpp is None:
      if slide_mpp <= 0:
        self.close()
        raise DatasetError(f'{path}: no µm/px in the file (Aperio MPP, OME PhysicalSizeX or TIFF resolution '
                           'tags); set config.slides.slide_mpp')
      mpp, source = float(slide_mpp), 'config.slides.slide_mpp'
    self.mpp, self.mpp_source = mpp, source
    self.levels = _levels(sizes, mpp)
    self._pages = pages
    segment = pages[0].tilelength * pages[0].tilewidth * 3 if pages[0].is_tiled else 1 << 20
    self._segment = functools.lru_cache(maxsize=max(4, int(cache_mb * 2 ** 20 / segment)))(self._decode)

  @staticmethod
  def _level_pages(tiff) -> list:
    series = tiff.series[0]
    pages = []
    for level in series.levels:
      page = level.pages[0]
      pages.append(page.aspage() if hasattr(page, 'aspage') else page)
    sizes = [(p.imagewidth, p.imagelength) for p in pages]
    if any(b[0] > a[0] or b[1] > a[1] for a, b in zip(sizes, sizes[1:])):
      raise DatasetError(f'{tiff.filehandle.path}: pyramid levels are not in decreasing size {sizes}')
    return pages

  def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
    out = np.full((height, width, 3), GLASS, np.uint8)
    page = self._pages[level]
    image_h, image_w = page.imagelength, page.imagewidth
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, image_w), min(y + height, image_h)
    if x1 <= x0 or y1 <= y0:
      return out
    seg_h, seg_w = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, image_w)
    seg_h = min(seg_h, image_h)
    across = -(-image_w // seg_w)
    for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
      for col in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
        segment = self._segment(level, row * across + col)
        if segment is None:
          continue  # a sparse (missing) tile reads as glass
        top, left = row * seg_h, col * seg_w
        ys, ye = max(y0, top), min(y1, top + segment.shape[0])
        xs, xe = max(x0, left), min(x1, left + segment.shape[1])
        if ye > ys and xe > xs:
          out[ys - y:ye - y, xs - x:xe - x] = segment[ys - top:ye - top, xs - left:xe - left]
    return out

  def _decode(self, level: int, index: int) -> Optional[np.ndarray]:
    """Segment `index` of a level decoded: `[h, w, 3]` uint8, or None where the file has none (cached)."""
    page = self._pages[level]
    count = page.databytecounts[index]
    if not count:
      return None
    try:
      with self._io_lock:
        handle = self._tiff.filehandle
        handle.seek(page.dataoffsets[index])
        data = handle.read(count)
      segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
    except Exception as error:  # corrupt or truncated data: codec errors of every kind
      raise DatasetError(f'{self.path}: cannot decode tile {index} of level {level} '
                         f'({type(error).__name__}: {error})') from error
    segment = np.asarray(segment)
    return segment.reshape(-1, *segment.shape[-3:])[0, ..., :3]

  def close(self) -> None:
    tiff = getattr(self, '_tiff', None)
    if tiff is not None:
      tiff.close()
      self._tiff = None


def page_compression_needs_codecs(page) -> bool:
  return int(page.compression) not in (1, 8, 32946)   # none, deflate (zlib): no imagecodecs needed


class OpenSlideSlide(Slide):
  """OpenSlide backend (thread-safe handle; regions composited on white where transparent)."""

  backend = 'openslide'

  def __init__(self, path: str, slide_mpp: float = 0.0):
    try:
      import openslide
    except (ImportError, OSError) as error:
      ext = os.path.splitext(path)[1] or 'this format'
      raise slides_extra_error(path, f'reading {ext} slides', 'openslide') from error
    self.path = path
    try:
      self._slide = openslide.OpenSlide(path)
    except Exception as error:
      raise DatasetError(f'{path}: OpenSlide cannot open it ({type(error).__name__}: {error})') from error
    properties = self._slide.properties
    mpp = _plausible(float(properties['openslide.mpp-x'])) if 'openslide.mpp-x' in properties else None
    source = 'openslide.mpp-x'
    if mpp is None:
      if slide_mpp <= 0:
        self.close()
        raise DatasetError(f'{path}: no µm/px in the file (openslide.mpp-x); set config.slides.slide_mpp')
      mpp, source = float(slide_mpp), 'config.slides.slide_mpp'
    self.mpp, self.mpp_source = mpp, source
    self.levels = _levels(list(self._slide.level_dimensions), mpp)

  def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
    downsample = self._slide.level_downsamples[level]
    try:
      rgba = self._slide.read_region((int(round(x * downsample)), int(round(y * downsample))), level,
                                     (width, height))
    except Exception as error:
      raise DatasetError(f'{self.path}: cannot read level {level} at ({x}, {y}) '
                         f'({type(error).__name__}: {error})') from error
    white = Image.new('RGBA', rgba.size, (GLASS, GLASS, GLASS, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert('RGB'))

  def close(self) -> None:
    slide = getattr(self, '_slide', None)
    if slide is not None:
      slide.close()
      self._slide = None


def open_slide(path: str, reader: str = 'auto', slide_mpp: float = 0.0, cache_mb: float = 64.0) -> Slide:
  """Opens `path` with the backend `reader` ('auto' chooses by extension). Raises `DatasetError`."""
  if not os.path.isfile(path):
    raise DatasetError(f'{path}: slide file not found')
  if reader == 'auto':
    reader = 'openslide' if path.lower().endswith(OPENSLIDE_EXTENSIONS) else 'tifffile'
  if reader == 'openslide':
    return OpenSlideSlide(path, slide_mpp)
  return TiffSlide(path, slide_mpp, cache_mb)


def choose_level(levels: list[Level], model_mpp: float, tolerance: float = 0.02) -> int:
  """Index of the coarsest level at or finer than `model_mpp` (mpp <= model_mpp x (1 + tolerance)).

  Level 0 only when no coarser level qualifies; when even level 0 is coarser than the model, level 0
  (the caller upsamples).
  """
  limit = model_mpp * (1.0 + tolerance)
  eligible = [index for index, level in enumerate(levels) if level.mpp <= limit]
  if not eligible:
    return 0
  return max(eligible, key=lambda index: levels[index].mpp)


def read_resampled(slide: Slide, level: int, box: tuple[float, float, float, float],
                   size: tuple[int, int]) -> np.ndarray:
  """`[size[1], size[0], 3]` uint8: the level-`level` box `(x0, y0, x1, y1)` (float pixels) resized to `size`.

  Reads the enclosing integer region plus one pixel of margin and resamples with PIL (bilinear with its
  antialiasing support when reducing); an integer box of the same size is copied exactly.
  """
  x0, y0, x1, y1 = box
  width, height = size
  if (abs(x1 - x0 - width) < 1e-6 and abs(y1 - y0 - height) < 1e-6 and float(x0).is_integer()
      and float(y0).is_integer()):
    return slide.read_region(level, int(x0), int(y0), width, height)
  left, top = int(math.floor(x0)) - 1, int(math.floor(y0)) - 1
  right, bottom = int(math.ceil(x1)) + 1, int(math.ceil(y1)) + 1
  region = slide.read_region(level, left, top, right - left, bottom - top)
  image = Image.fromarray(region).resize(size, Image.BILINEAR,
                                         box=(x0 - left, y0 - top, x1 - left, y1 - top))
  return np.asarray(image)


def read_thumbnail(slide: Slide, target_mpp: float, band_px: int = 512) -> tuple[np.ndarray, float]:
  """The whole slide at about `target_mpp` µm/px, read band by band: -> (`[h, w, 3]` uint8, level-0 px/px).

  Reads from the coarsest level at or finer than `target_mpp` (never more than one band of it in memory).
  """
  level0 = slide.levels[0]
  scale = max(target_mpp / slide.mpp, 1.0)                      # level-0 pixels per thumbnail pixel
  width, height = max(1, int(round(level0.width / scale))), max(1, int(round(level0.height / scale)))
  scale_x, scale_y = level0.width / width, level0.height / height
  level = choose_level(slide.levels, target_mpp, 0.0)
  ds = slide.levels[level].downsample
  rows = max(1, int(band_px / (scale_y / ds)))                  # thumbnail rows per band
  out = np.empty((height, width, 3), np.uint8)
  for top in range(0, height, rows):
    bottom = min(height, top + rows)
    box = (0.0, top * scale_y / ds, width * scale_x / ds, bottom * scale_y / ds)
    out[top:bottom] = read_resampled(slide, level, box, (width, bottom - top))
  return out, 0.5 * (scale_x + scale_y)
