"""Tile grid and blended stitching of per-tile class scores into a mask, one row band at a time.

Geometry at the model's resolution ("model pixels"): tiles of `tile` px every `stride` px, the last row and
column reaching past the slide's edge (read as glass). The mask has one pixel per `d x d` model pixels
(`d` = mask_downsample divides tile and stride, so tile borders fall on mask pixel borders).

Blending: each tile's scores `[S, S, K]` are reduced to the mask resolution by `d x d` block means `p`,
and weighted by an importance map `w` `[S/d, S/d]` (`mean`: ones; `gaussian`: exp(-r^2 / 2 sigma^2) around
the tile centre, floored at 1e-3 so corners still count). The stitched score is
`sum_t w_t p_t / sum_t w_t`, a convex combination of the tiles covering a mask pixel: where overlapping
tiles agree, the result equals them exactly, so no seam can appear; where they differ (tile-edge effects),
the Gaussian favours each tile's centre.

Memory: the accumulator holds one tile row of the mask (`tile / d` rows x mask width x K floats); rows are
finished, arg-maxed and handed to `emit` as soon as no later tile can touch them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
  """Tiles over a `width x height` image (model pixels)."""

  width: int
  height: int
  tile: int
  stride: int
  d: int       # model pixels per mask pixel

  @property
  def cols(self) -> int:
    return 1 + max(0, math.ceil((self.width - self.tile) / self.stride))

  @property
  def rows(self) -> int:
    return 1 + max(0, math.ceil((self.height - self.tile) / self.stride))

  @property
  def mask_width(self) -> int:
    return math.ceil(self.width / self.d)

  @property
  def mask_height(self) -> int:
    return math.ceil(self.height / self.d)

  def origin(self, row: int, col: int) -> tuple[int, int]:
    """(x, y) of a tile's top-left corner in model pixels."""
    return col * self.stride, row * self.stride


def importance_map(tile: int, blend: str, sigma_fraction: float = 0.125) -> np.ndarray:
  """`[tile, tile]` float32 blending weights (`mean`: ones; `gaussian`: centred, floored at 1e-3 x peak).

  `tile` is the tile size at the resolution the weights are applied at (the mask's: model tile / d).
  """
  if blend == 'mean':
    return np.ones((tile, tile), np.float32)
  centre = (tile - 1) / 2.0
  sigma = max(sigma_fraction * tile, 1e-3)
  axis = np.exp(-0.5 * ((np.arange(tile) - centre) / sigma) ** 2)
  weights = np.outer(axis, axis)
  return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


def block_mean(x: np.ndarray, d: int) -> np.ndarray:
  """`[H, W, ...]` -> `[H/d, W/d, ...]` means over `d x d` blocks (H, W divisible by d)."""
  if d == 1:
    return x
  rows = x[0::d]
  for i in range(1, d):        # strided sums: several times faster than a mean over reshaped axes
    rows = rows + x[i::d]
  out = rows[:, 0::d]
  for i in range(1, d):
    out = out + rows[:, i::d]
  return out * (1.0 / (d * d))


class BandStitcher:
  """Accumulates blended tile scores; emits finished mask rows as `emit(y0, rows uint8 [h, mask_width])`.

  Feed tiles in row-major order with `add(row, col, scores)` (rows may be skipped: tiles without tissue),
  then call `finish()`. A mask pixel that no processed tile covers gets `empty_value`. `weights` is the
  `[tile / d, tile / d]` importance map; `scores_out(y0, [h, W, K])`, if given, receives blended scores.
  With `gated`, every tile also brings its tissue fraction `[tile / d, tile / d]`, blended the same way; a
  mask pixel whose blended tissue fraction is below 1/2 gets `empty_value`.
  """

  def __init__(self, grid: Grid, num_classes: int, weights: np.ndarray,
               emit: Callable[[int, np.ndarray], None], empty_value: int,
               scores_out: Callable[[int, np.ndarray], None] | None = None, gated: bool = False):
    self.grid = grid
    self.k = num_classes
    self.tile_m = grid.tile // grid.d
    self.stride_m = grid.stride // grid.d
    self.width_m = (grid.cols - 1) * self.stride_m + self.tile_m
    if weights.shape != (self.tile_m, self.tile_m):
      raise ValueError(f'weights are {weights.shape}, expected the mask-resolution tile {self.tile_m}')
    self.weights_m = weights.astype(np.float32)                           # [tile_m, tile_m]
    self.emit = emit
    self.scores_out = scores_out
    self.empty_value = empty_value
    self.gated = gated
    self.acc = np.zeros((self.tile_m, self.width_m, self.k + int(gated)), np.float32)
    self.wsum = np.zeros((self.tile_m, self.width_m), np.float32)
    self.row = 0                 # tile row whose top is the accumulator's first row
    self.done_rows = 0           # mask rows emitted so far

  def add(self, row: int, col: int, scores: np.ndarray, tissue: np.ndarray | None = None) -> None:
    """Adds one tile's `[tile, tile, K]` scores (and, when gated, its `[tile/d, tile/d]` tissue fraction)."""
    if row < self.row:
      raise ValueError(f'tiles must come in row-major order (row {row} after row {self.row})')
    if self.gated != (tissue is not None):
      raise ValueError('a gated stitcher needs every tile\'s tissue fraction, an ungated one none')
    while self.row < row:
      self._advance()
    x = col * self.stride_m
    values = block_mean(np.asarray(scores, np.float32), self.grid.d)
    if tissue is not None:
      values = np.concatenate([values, tissue.astype(np.float32)[..., None]], axis=-1)
    self.acc[:, x:x + self.tile_m] += values * self.weights_m[..., None]
    self.wsum[:, x:x + self.tile_m] += self.weights_m

  def _emit_rows(self, count: int) -> None:
    count = min(count, self.grid.mask_height - self.done_rows)
    if count <= 0:
      return
    wsum = self.wsum[:count, :self.grid.mask_width]
    acc = self.acc[:count, :self.grid.mask_width]
    covered = wsum > 0
    if self.gated:
      covered &= acc[..., -1] >= 0.5 * wsum
      acc = acc[..., :-1]
    if self.scores_out is not None:
      blended = acc / np.maximum(wsum, 1e-12)[..., None]
      self.scores_out(self.done_rows, np.where(covered[..., None], blended, 0))
    labels = np.where(covered, np.argmax(acc, axis=-1), self.empty_value).astype(np.uint8)
    self.emit(self.done_rows, labels)
    self.done_rows += count

  def _advance(self) -> None:
    """Finishes the top `stride` rows (no later tile row reaches them) and shifts the band up."""
    self._emit_rows(self.stride_m)
    s = self.stride_m
    self.acc[:-s] = self.acc[s:].copy() if s < self.tile_m else 0
    self.wsum[:-s] = self.wsum[s:].copy() if s < self.tile_m else 0
    self.acc[max(self.tile_m - s, 0):] = 0
    self.wsum[max(self.tile_m - s, 0):] = 0
    self.row += 1

  def finish(self) -> None:
    """Emits every remaining row (empty tile rows included)."""
    while self.done_rows < self.grid.mask_height:
      if self.row < self.grid.rows - 1:
        self._advance()
      else:
        self._emit_rows(self.tile_m)
        if self.done_rows < self.grid.mask_height:   # rows below the last tile (cannot happen by design)
          raise AssertionError('grid does not cover the mask')
