"""Resampling of absolute position tables to another token grid, PyTorch/timm-exact.

timm's ViT built with `dynamic_img_size=True` (CONCH, UNI) resizes its position table on every forward with
`timm.layers.resample_abs_pos_embed`: the prefix (class) tokens are kept apart and the grid part goes
through `F.interpolate(mode='bicubic', antialias=True, align_corners=False)`. PyTorch's anti-aliased
bicubic (`_upsample_bicubic2d_aa`, the separable "AA" kernel shared with PIL) is, per axis and output
index i, with scale = in / out:

* centre = scale * (i + 0.5); support = 2 * max(scale, 1) (cubic taps 4, widened when downsampling);
* taps j in [max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in)) (`int` truncates
  toward zero, as the C++ cast), i.e. the window is cut at the borders (no clamped/replicated taps);
* weight_j = cubic((j - centre + 0.5) / max(scale, 1)), then divided by the sum of the window's weights;
* cubic is Keys' kernel with a = -0.5 (PIL's value; PyTorch's non-AA bicubic uses a = -0.75 with clamped
  border taps instead). Upsampling with `antialias=True` uses this same code with support 2.

Both axes are expressed as float64 `[out, in]` weight matrices (built once on the host, at trace time)
applied with two einsums, as `ops.resize_bilinear`.
"""

from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from protoseg_jax import ops

# `VitConfig.pos_embed_resample` values.
BICUBIC_ANTIALIAS = 'bicubic_antialias'   # timm's `resample_abs_pos_embed` (CONCH / UNI at run time)
BILINEAR = 'bilinear'                     # F.interpolate(mode='bilinear', align_corners=False), no AA
METHODS = (BICUBIC_ANTIALIAS, BILINEAR)

# Keys' cubic convolution parameter of PyTorch's (and PIL's) anti-aliased bicubic filter.
AA_CUBIC_A = -0.5

Array = Union[jax.Array, np.ndarray]


def _cubic(x: np.ndarray, a: float = AA_CUBIC_A) -> np.ndarray:
  """Keys' cubic convolution kernel, support [-2, 2]."""
  x = np.abs(x)
  inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  outer = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
  """1-D weights `[out_size, in_size]` of `F.interpolate(mode='bicubic', antialias=True,
  align_corners=False)` along one axis (float64, read-only; rows sum to 1)."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f'cannot resample {in_size} -> {out_size} positions')
  scale = in_size / out_size
  widen = max(scale, 1.0)
  support = 2.0 * widen
  weights = np.zeros((out_size, in_size), np.float64)
  for index in range(out_size):
    centre = scale * (index + 0.5)
    first = max(int(centre - support + 0.5), 0)
    stop = min(int(centre + support + 0.5), in_size)
    taps = _cubic((np.arange(first, stop, dtype=np.float64) - centre + 0.5) / widen)
    total = taps.sum()
    weights[index, first:stop] = taps / total if total != 0.0 else taps
  weights.setflags(write=False)
  return weights


def _matrix(method: str, in_size: int, out_size: int) -> np.ndarray:
  if method == BICUBIC_ANTIALIAS:
    return bicubic_antialias_matrix(in_size, out_size)
  if method == BILINEAR:
    return ops.bilinear_matrix(in_size, out_size, align_corners=False)
  raise ValueError(f'unknown position-table resampling {method!r} (config.model.vit.pos_embed_resample): '
                   f'expected one of {METHODS}')


def resize_grid(x: Array, out_hw: tuple[int, int], method: str = BICUBIC_ANTIALIAS) -> Array:
  """Resizes `[..., H, W, C]` to `[..., out_h, out_w, C]` with `method` (separable, two einsums).

  A NumPy input is computed in float64 with NumPy and returned as float32 (no JAX); a JAX input stays JAX
  (float32 math, differentiable).
  """
  in_h, in_w = x.shape[-3], x.shape[-2]
  out_h, out_w = (int(size) for size in out_hw)
  if (in_h, in_w) == (out_h, out_w):
    return x
  rows, cols = _matrix(method, in_h, out_h), _matrix(method, in_w, out_w)
  if isinstance(x, np.ndarray):
    out = np.einsum('oh,...hwc->...owc', rows, x.astype(np.float64))
    return np.einsum('pw,...owc->...opc', cols, out).astype(np.float32)
  x = x.astype(jnp.float32)
  precision = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,...hwc->...owc', jnp.asarray(rows, jnp.float32), x, precision=precision)
  return jnp.einsum('pw,...owc->...opc', jnp.asarray(cols, jnp.float32), x, precision=precision)


def resample_pos_embed(pos_embed: Array, num_prefix: int, grid_hw: tuple[int, int],
                       method: str = BICUBIC_ANTIALIAS) -> Array:
  """Resizes the square grid part of `[1, prefix + G*G, D]` to `[1, prefix + h*w, D]`; prefix kept as is.

  `method='bicubic_antialias'` equals `timm.layers.resample_abs_pos_embed(pos_embed, (h, w),
  num_prefix_tokens=prefix)`; `'bilinear'` is `F.interpolate(mode='bilinear', align_corners=False)`.
  Returns the input unchanged when the grid already is `grid_hw`. NumPy in, NumPy (float32) out.
  """
  if method not in METHODS:
    _matrix(method, 1, 1)  # raises, naming the config key
  xp = np if isinstance(pos_embed, np.ndarray) else jnp
  prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
  side = int(round(np.sqrt(grid.shape[1])))
  if side * side != grid.shape[1]:
    raise ValueError(f'position table of {grid.shape[1]} grid tokens is not square')
  if (side, side) == tuple(grid_hw):
    return pos_embed
  grid = resize_grid(grid.reshape(1, side, side, -1), grid_hw, method)
  grid = grid.reshape(1, grid_hw[0] * grid_hw[1], -1)
  return xp.concatenate([prefix.astype(grid.dtype), grid], axis=1)
