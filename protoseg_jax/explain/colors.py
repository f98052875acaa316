"""Colours for the explanation outputs, built here in OKLab (no plotting library needed).

* `similarity_lut()`: a 256-entry perceptually uniform sequential colormap (dark blue-violet -> teal ->
  green -> yellow, the familiar look of viridis) for similarity heatmaps. It is a path in OKLab with
  linearly rising lightness and a hue sweep 300° -> 105°, pulled into the sRGB gamut by lowering chroma,
  then re-sampled at equal OKLab arc length, so consecutive entries are equally far apart perceptually
  and lightness rises monotonically (it reads correctly in grey-scale print and for colour-blind readers).
* `prototype_palette()`: P distinct colours for prototype maps, grouped by class: a class hue (by default
  from the class colours, e.g. the BCSS mask palette) and, inside the group, per-prototype lightness and a
  small hue offset alternating with the position's parity (text/image in DualProtoSeg's interleaved bank).

OKLab is Björn Ottosson's perceptual colour space (2020); the forward matrices below are its published
definition, the inverses are computed from them.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

# linear sRGB -> LMS, and cube-rooted LMS -> Lab (OKLab's definition).
_RGB_TO_LMS = np.asarray([[0.4122214708, 0.5363325363, 0.0514459929],
                          [0.2119034982, 0.6806995451, 0.1073969566],
                          [0.0883024619, 0.2817188376, 0.6299787005]])
_LMS_TO_LAB = np.asarray([[0.2104542553, 0.7936177850, -0.0040720468],
                          [1.9779984951, -2.4285922050, 0.4505937099],
                          [0.0259040371, 0.7827717662, -0.8086757660]])
_LMS_TO_RGB = np.linalg.inv(_RGB_TO_LMS)
_LAB_TO_LMS = np.linalg.inv(_LMS_TO_LAB)

BACKGROUND_COLOR = (0, 0, 0)  # prototype maps: pixels outside every tissue class


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
  """sRGB in [0, 1] -> linear light (the sRGB transfer function)."""
  c = np.asarray(c, np.float64)
  return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
  """Linear light -> sRGB in [0, 1] (no clipping)."""
  c = np.asarray(c, np.float64)
  return np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.abs(c) ** (1 / 2.4) * np.sign(c) - 0.055)


def rgb_to_oklab(rgb: np.ndarray) -> np.ndarray:
  """`[..., 3]` sRGB in [0, 1] -> `[..., 3]` OKLab (L in [0, 1])."""
  lms = srgb_to_linear(rgb) @ _RGB_TO_LMS.T
  return np.cbrt(lms) @ _LMS_TO_LAB.T


def oklab_to_rgb(lab: np.ndarray) -> np.ndarray:
  """`[..., 3]` OKLab -> `[..., 3]` sRGB, not clipped (values outside [0, 1] are out of gamut)."""
  lms = (np.asarray(lab, np.float64) @ _LAB_TO_LMS.T) ** 3
  return linear_to_srgb(lms @ _LMS_TO_RGB.T)


def _lch_to_lab(lightness, chroma, hue_deg) -> np.ndarray:
  hue = np.deg2rad(hue_deg)
  return np.stack(np.broadcast_arrays(lightness, chroma * np.cos(hue), chroma * np.sin(hue)), axis=-1)


def max_chroma(lightness: np.ndarray, hue_deg: np.ndarray, iterations: int = 30) -> np.ndarray:
  """Largest OKLCh chroma inside the sRGB gamut at each (lightness, hue), by bisection."""
  lightness, hue_deg = np.broadcast_arrays(np.asarray(lightness, np.float64), np.asarray(hue_deg, np.float64))
  low, high = np.zeros(lightness.shape), np.full(lightness.shape, 0.4)
  for _ in range(iterations):
    mid = 0.5 * (low + high)
    rgb = oklab_to_rgb(_lch_to_lab(lightness, mid, hue_deg))
    inside = np.all((rgb >= -1e-9) & (rgb <= 1 + 1e-9), axis=-1)
    low, high = np.where(inside, mid, low), np.where(inside, high, mid)
  return low


def _lch_to_rgb8(lightness, chroma, hue_deg) -> np.ndarray:
  rgb = oklab_to_rgb(_lch_to_lab(lightness, chroma, hue_deg))
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _similarity_lut() -> np.ndarray:
  t = np.linspace(0.0, 1.0, 4096)
  lightness = 0.27 + (0.94 - 0.27) * t
  hue = 300.0 - (300.0 - 105.0) * t
  wanted = 0.12 + 0.06 * t
  chroma = np.minimum(wanted, 0.98 * max_chroma(lightness, hue))
  lab = _lch_to_lab(lightness, chroma, hue)
  arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(lab, axis=0), axis=-1))])
  even = np.linspace(0.0, arc[-1], 256)
  resampled = np.stack([np.interp(even, arc, lab[:, i]) for i in range(3)], axis=-1)
  rgb = np.clip(np.round(oklab_to_rgb(resampled) * 255.0), 0, 255).astype(np.uint8)
  rgb.setflags(write=False)
  return rgb


def similarity_lut() -> np.ndarray:
  """`[256, 3]` uint8 sequential colormap, low -> high (read-only; copy to modify)."""
  return _similarity_lut()


def apply_lut(values: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
  """`[...]` floats -> `[..., 3]` uint8 colours; `value_range = (lo, hi)` maps to the ends (clipped).

  A degenerate range (`hi <= lo`) maps everything to the lowest colour. NaN maps to the lowest colour.
  """
  lo, hi = float(value_range[0]), float(value_range[1])
  values = np.asarray(values, np.float64)
  scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
  index = np.clip(np.round(np.nan_to_num(scaled, nan=0.0) * 255.0), 0, 255).astype(np.int64)
  return similarity_lut()[index]


def class_hue(rgb: Sequence[int]) -> float:
  """OKLCh hue in degrees of an 8-bit sRGB colour."""
  lab = rgb_to_oklab(np.asarray(rgb, np.float64) / 255.0)
  return float(np.rad2deg(np.arctan2(lab[2], lab[1])) % 360.0)


def prototype_palette(num_classes: int, prototypes_per_class: int,
                      class_colors: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
  """`[P, 3]` uint8 colours, P = num_classes * prototypes_per_class, class-major like the bank.

  Class c's prototypes share the class hue (from `class_colors[c]` when given, else hues evenly spaced from
  red). Position g in the group gets lightness from 0.40 to 0.88 in a strided order (neighbours in the bank
  are far apart in lightness) and a hue offset of +12° for even g, -12° for odd g; chroma is 85% of the
  largest in-gamut chroma, at most 0.2. Deterministic.
  """
  if num_classes < 1 or prototypes_per_class < 1:
    raise ValueError(f'need at least one class and one prototype per class, got {num_classes}, '
                     f'{prototypes_per_class}')
  if class_colors is not None:
    if len(class_colors) < num_classes:
      raise ValueError(f'{len(class_colors)} class colours for {num_classes} classes')
    hues = np.asarray([class_hue(class_colors[c]) for c in range(num_classes)])
  else:
    hues = (29.0 + 360.0 * np.arange(num_classes) / num_classes) % 360.0
  group = prototypes_per_class
  # A stride co-prime with the group size spreads consecutive positions over the lightness range.
  stride = next(s for s in range(max(group // 2 - 1, 1), 0, -1) if np.gcd(s, group) == 1) if group > 2 else 1
  rank = (np.arange(group) * stride) % group
  lightness = 0.40 + 0.48 * rank / max(group - 1, 1)
  offsets = np.where(np.arange(group) % 2 == 0, 12.0, -12.0) if group > 1 else np.zeros(1)
  hue = (hues[:, None] + offsets[None, :]) % 360.0
  lightness = np.broadcast_to(lightness[None, :], hue.shape)
  chroma = np.minimum(0.85 * max_chroma(lightness, hue), 0.2)
  return _lch_to_rgb8(lightness, chroma, hue).reshape(num_classes * group, 3)


def hex_color(rgb: Sequence[int]) -> str:
  """`(r, g, b)` 8-bit -> `'#rrggbb'`."""
  return '#' + ''.join(f'{int(v):02x}' for v in rgb[:3])
