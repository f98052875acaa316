"""Image files to arrays, for every method: tiles to uint8 RGB, masks to class values, palette PNGs, overlays.

`read_image` converts every mode a tile comes in to `[H, W, 3]` uint8 RGB, or refuses it by name; it never
clips or guesses silently:

  mode (Pillow)                 in the file                     read as
  RGB                           8-bit RGB (PNG, JPEG, TIFF, ...) as is
  RGBA, LA, PA, P + tRNS,       alpha / transparency            composited over white (the colour of glass;
    L / RGB + tRNS key                                          what the transparent area of a slide shows)
  P                             palette                         the palette's colours
  L, 1                          8-bit / 1-bit grey              replicated to 3 channels (1-bit: 0 / 255)
  I;16, I;16B, I;16L, I         16-bit grey (PNG, TIFF)         round(v * 255 / 65535), replicated
  RGB, RGBA (from 16 bits)      48 / 64-bit PNG or TIFF         Pillow's 8 bits: the high byte, v >> 8 (at
                                                                most one level from the rounded scaling)
  YCbCr, RGBX                   TIFF                            converted to RGB
  CMYK, F, I (32-bit), signed 16-bit, LAB, ...                  refused (DatasetError naming the file)
  several frames / pages        multi-page TIFF, APNG           the first, with one warning per process

`probe_images` checks a whole set from its headers only (size, mode, bit depth; a PNG / JPEG cut short),
before anything is decoded or compiled. Every problem raises `DatasetError` naming the file.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import warnings
from typing import BinaryIO, Optional, Sequence, Union

import numpy as np
from PIL import Image

from protoseg_jax.errors import DatasetError

Source = Union[str, os.PathLike, BinaryIO]

# The colours of BCSS-WSSS's RGB masks: TUM, STR, LYM, NEC, BACK (class value = row).
BCSS_PALETTE = np.asarray([(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255), (255, 255, 255)], np.uint8)

_ALPHA_MODES = ('RGBA', 'LA', 'PA')
_RGB_MODES = ('RGB', 'L', '1', 'P', 'RGBX', 'YCbCr') + _ALPHA_MODES
_GREY16_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_MASK_VALUE_MODES = ('P', 'L', '1', 'I') + _GREY16_MODES
_MASK_COLOUR_MODES = ('RGB', 'RGBA')
_TRUNCATION_CHECK_BYTES = 1024
_warned_multiframe = False


def _name(source: Source, name: Optional[str]) -> str:
  if name is not None:
    return name
  return os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(source)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What an image file's header says: no pixel is decoded."""

  path: str
  format: str       # 'PNG', 'JPEG', 'TIFF', ...
  mode: str         # Pillow's mode ('RGB', 'I;16', 'P', ...)
  height: int
  width: int
  bits: int         # bits per sample in the file (1, 8, 16, 32)
  frames: int       # frames / pages (the first is read)


def _sample_format(image: Image.Image) -> tuple[int, bool]:
  """`(bits per sample, signed)` in the file, read before `load()` (which drops the tile descriptors)."""
  tags = getattr(image, 'tag_v2', None)
  if tags is not None and 258 in tags:  # TIFF BitsPerSample; SampleFormat 2 = signed integer
    bits = tags[258]
    sample_format = tags.get(339, 1)
    return (max(bits) if isinstance(bits, tuple) else int(bits),
            2 in (sample_format if isinstance(sample_format, tuple) else (sample_format,)))
  rawmode = ''
  if image.tile:
    args = image.tile[0].args
    rawmode = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else '')
  if ';16' in rawmode:  # PNG 'RGB;16B', 'I;16B', 'LA;16B', ...
    return 16, rawmode.endswith('S')
  if image.mode in _GREY16_MODES:
    return 16, False
  if image.mode in ('I', 'F'):
    return 32, image.mode == 'I'
  return (1 if image.mode == '1' else 8), False


def _check_mode(name: str, mode: str, bits: int, signed: bool) -> None:
  """Raises `DatasetError` for a mode `read_image` does not convert (one rule for headers and pixels)."""
  if mode == 'CMYK':
    raise DatasetError(f'{name}: CMYK image: its colours depend on the print profile it was made for; '
                       f'convert the tiles to RGB')
  if mode == 'F':
    raise DatasetError(f'{name}: 32-bit float image (mode F) has no defined value range; save the tiles as '
                       f'8- or 16-bit')
  if mode == 'I' and bits != 16:
    raise DatasetError(f'{name}: {bits}-bit integer image (mode I) has no defined value range; save the '
                       f'tiles as 8- or 16-bit')
  if (mode == 'I' or mode in _GREY16_MODES) and signed:
    raise DatasetError(f'{name}: signed {bits}-bit integer image; save the tiles as unsigned 8- or 16-bit')
  if mode not in _RGB_MODES and mode not in _GREY16_MODES and mode != 'I':
    raise DatasetError(f'{name}: image mode {mode!r} is not read (RGB, RGBA, grey, palette, 1-bit and 16-bit '
                       f'grey are); convert the tiles to RGB')


def _open(source: Source, name: Optional[str] = None) -> tuple[Image.Image, int, bool]:
  """`(image, bits per sample, signed)`, fully decoded (a truncated file fails here); `DatasetError`."""
  name = _name(source, name)
  image = None
  try:
    image = Image.open(source)
    bits, signed = _sample_format(image)
    frames = getattr(image, 'n_frames', 1)
    image.load()
  except (FileNotFoundError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    if image is not None:
      image.close()
    if isinstance(error, FileNotFoundError):
      raise DatasetError(f'{name}: file not found') from None
    raise DatasetError(f'{name}: unreadable image ({error})') from None
  if frames > 1:
    global _warned_multiframe
    if not _warned_multiframe:
      _warned_multiframe = True
      warnings.warn(f'{name}: {frames} frames / pages; the first is read (other such files are not '
                    f'reported)', stacklevel=3)
  return image, bits, signed


def _over_white(rgba: np.ndarray) -> np.ndarray:
  """`[H, W, 4]` uint8 -> `[H, W, 3]`: `round(c * a / 255 + 255 * (1 - a / 255))`, exactly, in integers."""
  colour, alpha = rgba[..., :3].astype(np.int32), rgba[..., 3:].astype(np.int32)
  return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def read_image(path: Source, *, name: Optional[str] = None) -> np.ndarray:
  """`[H, W, 3]` uint8 RGB from a file path or binary file object (modes: the module docstring).

  `name` (default: the path) starts every error message.
  """
  name = _name(path, name)
  image, bits, signed = _open(path, name)
  with image:  # closes what Pillow keeps open (multi-frame files)
    _check_mode(name, image.mode, bits, signed)
    return _to_rgb(image, name)


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
  mode = image.mode
  if mode in _GREY16_MODES or mode == 'I':
    raw = np.asarray(image).astype(np.int64)
    if raw.size and (raw.min() < 0 or raw.max() > 65535):
      raise DatasetError(f'{name}: 16-bit image holds values outside 0..65535 ({raw.min()}..{raw.max()})')
    grey = ((2 * raw + 257) // 514).astype(np.uint8)  # round(v / 257): no ties (257 is odd)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    key = image.info.get('transparency')
    if isinstance(key, int):  # a tRNS grey key: that value is transparent
      rgb = _over_white(np.concatenate([rgb, np.where(raw == key, 0, 255).astype(np.uint8)[..., None]], -1))
    return rgb
  if mode in _ALPHA_MODES or image.info.get('transparency') is not None:
    return _over_white(np.asarray(image.convert('RGBA')))
  if mode == 'RGB':
    return np.asarray(image)
  return np.asarray(image.convert('RGB'))


def read_mask(path: Source, num_values: int, palette: Optional[np.ndarray] = None, *,
              name: Optional[str] = None) -> np.ndarray:
  """`[H, W]` uint8 class values from a palette, grey (8/16-bit) or palette-coloured RGB(A) mask.

  Palette indices and grey values are the class values (never scaled); RGB colours are looked up in
  `palette` (default `BCSS_PALETTE`, alpha ignored). Every value must be below `num_values`.
  """
  name = _name(path, name)
  image, _, _ = _open(path, name)
  with image:
    return _mask_values(image, num_values, palette, name)


def _mask_values(image: Image.Image, num_values: int, palette: Optional[np.ndarray], name: str) -> np.ndarray:
  if image.mode in _MASK_VALUE_MODES:
    mask = np.asarray(image).astype(np.int64)  # indices / values, not colours
  elif image.mode in _MASK_COLOUR_MODES:
    rgb = np.asarray(image.convert('RGB')).astype(np.int32)
    colours = BCSS_PALETTE if palette is None else np.asarray(palette, np.int32)
    codes = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
    lookup = {int(r) * 65536 + int(g) * 256 + int(b): i for i, (r, g, b) in enumerate(colours)}
    unknown = set(np.unique(codes).tolist()) - set(lookup)
    if unknown:
      raise DatasetError(f'{name}: RGB mask has colours outside the palette (e.g. #{min(unknown):06x})')
    mask = np.vectorize(lookup.get, otypes=[np.int64])(codes)
  else:
    raise DatasetError(f'{name}: mask mode {image.mode!r} is not palette, grey or RGB')
  bad = np.unique(mask[(mask >= num_values) | (mask < 0)])
  if bad.size:
    raise DatasetError(f'{name}: mask values {bad.tolist()} outside 0..{num_values - 1}')
  return mask.astype(np.uint8)


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


# --- header-only checks ----------------------------------------------------------------------------------

def _check_not_cut_short(path: str, image_format: str, handle: BinaryIO) -> None:
  """A PNG must end with its IEND chunk, a JPEG with its EOI marker (within the last KiB): one small read."""
  marker = {'PNG': b'IEND\xaeB`\x82', 'JPEG': b'\xff\xd9'}.get(image_format)
  if marker is None:
    return
  handle.seek(0, os.SEEK_END)
  size = handle.tell()
  handle.seek(max(0, size - _TRUNCATION_CHECK_BYTES))
  if marker not in handle.read():
    raise DatasetError(f'{path}: truncated {image_format} ({size} bytes, no end marker; copied in part?)')


def _read_header(path: Union[str, os.PathLike]) -> tuple[ImageInfo, bool]:
  """`(ImageInfo, signed)` from the header (and, for PNG / JPEG, the last KiB); `DatasetError`."""
  name = os.fspath(path)
  try:
    with open(name, 'rb') as handle:
      with Image.open(handle) as image:
        bits, signed = _sample_format(image)
        info = ImageInfo(path=name, format=image.format or '', mode=image.mode, height=image.height,
                         width=image.width, bits=bits, frames=getattr(image, 'n_frames', 1))
      _check_not_cut_short(name, info.format, handle)
  except FileNotFoundError:
    raise DatasetError(f'{name}: file not found') from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise DatasetError(f'{name}: unreadable image ({error})') from None
  return info, signed


def probe_image(path: Union[str, os.PathLike], expected_hw: Optional[tuple[int, int]] = None,
                size_key: str = 'the expected size') -> ImageInfo:
  """One tile's `ImageInfo` from its header, or `DatasetError` naming the file.

  Refused: unreadable, cut short, a mode `read_image` refuses, or (with `expected_hw = (height, width)`)
  another size; `size_key` names where that size is set.
  """
  info, signed = _read_header(path)
  _check_mode(info.path, info.mode, info.bits, signed)
  if expected_hw is not None and (info.height, info.width) != tuple(int(size) for size in expected_hw):
    raise DatasetError(f'{info.path}: tile is {info.width}x{info.height}, {size_key} is '
                       f'{int(expected_hw[1])}x{int(expected_hw[0])}')
  return info


def _probe_mask(path: Union[str, os.PathLike]) -> ImageInfo:
  info, _ = _read_header(path)
  if info.mode not in _MASK_VALUE_MODES + _MASK_COLOUR_MODES:
    raise DatasetError(f'{info.path}: mask mode {info.mode!r} is not palette, grey or RGB')
  return info


def _probe_all(paths: Sequence[Union[str, os.PathLike]], threads: int, probe) -> list[ImageInfo]:
  """`probe` of every path on a thread pool, in order; the first bad file in `paths` order raises."""
  pool = concurrent.futures.ThreadPoolExecutor(max(1, threads))
  try:
    return list(pool.map(probe, paths))
  finally:
    pool.shutdown(wait=True, cancel_futures=True)  # after an error, the files not yet probed are skipped


def probe_images(paths: Sequence[Union[str, os.PathLike]], expected_hw: Optional[tuple[int, int]] = None,
                 threads: int = 8, size_key: str = 'the expected size') -> list[ImageInfo]:
  """`ImageInfo` of every tile from its header, in `paths` order, without decoding a pixel.

  Raises one `DatasetError` naming the first bad file: unreadable or truncated, a mode `read_image`
  refuses, or (with `expected_hw = (height, width)`) another size; `size_key` names where that size comes
  from in the message (e.g. 'config.data.image_size').
  """
  return _probe_all(paths, threads, functools.partial(probe_image, expected_hw=expected_hw,
                                                      size_key=size_key))


def validate_masks(pairs: Sequence[tuple[Union[str, os.PathLike], Union[str, os.PathLike]]],
                   threads: int = 8) -> list[ImageInfo]:
  """Headers of `(image, mask)` pairs: each readable, every mask in a mode `read_mask` reads and of the
  size of its image.

  Returns the masks' `ImageInfo`s. Mask values are checked where masks are decoded (`read_mask`).
  """
  images = _probe_all([image for image, _ in pairs], threads, probe_image)
  masks = _probe_all([mask for _, mask in pairs], threads, _probe_mask)
  for image, mask in zip(images, masks):
    if (mask.height, mask.width) != (image.height, image.width):
      raise DatasetError(f'{mask.path}: mask is {mask.width}x{mask.height} but its image is '
                         f'{image.width}x{image.height}')
  return masks
