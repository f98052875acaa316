"""The tile plan of an open slide, shared by `--mode=slides` and slide queries: the level read, the grid of
model-pixel tiles, the tissue tiles that are read at all, a reader for one tile, and the glass gate of the
mask's pixels.

Resolutions: a model pixel is `model_mpp` µm; `factor` level pixels and `to_level0` level-0 pixels per
model pixel; the mask has `d = config.slides.mask_downsample` model pixels per pixel; the tissue thumbnail
has `thumb_scale` level-0 pixels per pixel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import ml_collections
import numpy as np
from absl import logging
from scipy import ndimage

from protoseg_jax.slides import reader, stitch, tissue


@dataclasses.dataclass
class TilePlan:
  slide: reader.Slide
  config: ml_collections.ConfigDict     # config.slides
  level: int
  factor: float                         # level pixels per model pixel
  to_level0: float                      # level-0 pixels per model pixel
  grid: stitch.Grid
  thumb: np.ndarray                     # [h, w, 3] uint8 tissue thumbnail
  thumb_scale: float                    # level-0 pixels per thumbnail pixel
  tissue_map: np.ndarray                # [h, w] bool, the thumbnail's tissue (dust removed)
  tissue_threshold: float
  positions: list[tuple[int, int]]      # (row, col) of the tiles read, in order

  @property
  def gated(self) -> bool:
    return self.config.tissue_method != 'none'

  @property
  def per_thumb(self) -> float:
    """Thumbnail pixels per model pixel."""
    return self.to_level0 / self.thumb_scale

  def read_tile(self, position: tuple[int, int]) -> tuple[tuple[int, int], np.ndarray, Optional[np.ndarray]]:
    """-> (position, uint8 `[S, S, 3]` tile at model resolution, its tissue fraction per mask pixel
    `[S/d, S/d]` or None when ungated). Tissue is measured at full resolution for sharp glass edges (the
    thumbnail only picks the tiles)."""
    row, col = position
    x, y = self.grid.origin(row, col)
    size, factor = self.grid.tile, self.factor
    image = reader.read_resampled(self.slide, self.level, (x * factor, y * factor, (x + size) * factor,
                                                           (y + size) * factor), (size, size))
    fraction = None
    if self.gated:
      measure = tissue.tissue_measure(image, self.config.tissue_method)
      fraction = stitch.block_mean((measure > self.tissue_threshold).astype(np.float32), self.grid.d)
    return position, image, fraction


class MaskGate:
  """Coarse glass gate per mask pixel: the thumbnail's tissue, grown by one thumbnail pixel so that the
  tiles' fine gate decides at the edges; the nearest thumbnail pixel of each mask pixel's centre."""

  def __init__(self, plan: TilePlan):
    tissue_map = plan.tissue_map
    self._coarse = (ndimage.binary_dilation(tissue_map, np.ones((3, 3), bool)) if plan.gated
                    else tissue_map)
    self._thumb_per_mask = plan.grid.d * plan.per_thumb
    self._rows = tissue_map.shape[0]
    self._cols = np.minimum(((np.arange(plan.grid.mask_width) + 0.5) * self._thumb_per_mask).astype(np.int64),
                            tissue_map.shape[1] - 1)

  def rows(self, y0: int, height: int) -> np.ndarray:
    """`[height, mask_width]` bool: mask rows `y0 .. y0 + height - 1` that may hold tissue."""
    rows = np.minimum(((np.arange(y0, y0 + height) + 0.5) * self._thumb_per_mask).astype(np.int64),
                      self._rows - 1)
    return self._coarse[rows[:, None], self._cols[None, :]]


def plan_tiles(slide: reader.Slide, config_slides: ml_collections.ConfigDict, model_mpp: float,
               tile_size: int, stride: int) -> TilePlan:
  """Level, grid and tissue tiles of `slide` for a model of `model_mpp` µm/px and `tile_size` tiles every
  `stride` model pixels (`config.slides`: level tolerance, tissue detection, minimum tissue fraction)."""
  c = config_slides
  level0 = slide.levels[0]
  level = reader.choose_level(slide.levels, model_mpp, c.mpp_tolerance)
  factor = model_mpp / slide.levels[level].mpp
  if factor < 1 - c.mpp_tolerance:
    logging.warning('%s: slide (%.3f µm/px) is coarser than the model (%.3f µm/px): upsampling', slide.path,
                    slide.mpp, model_mpp)
  to_level0 = model_mpp / slide.mpp
  grid = stitch.Grid(max(1, math.ceil(level0.width / to_level0)),
                     max(1, math.ceil(level0.height / to_level0)), tile_size, stride, int(c.mask_downsample))
  thumb, thumb_scale = reader.read_thumbnail(slide, c.tissue_mpp)
  min_object_px = int(c.tissue_min_area_um2 / (thumb_scale * slide.mpp) ** 2)
  tissue_map, threshold = tissue.tissue_mask(thumb, c.tissue_method, c.tissue_threshold,
                                             c.tissue_min_threshold, min_object_px)
  per_thumb = to_level0 / thumb_scale
  positions = []
  for row in range(grid.rows):
    for col in range(grid.cols):
      x, y = grid.origin(row, col)
      box = (x * per_thumb, y * per_thumb, (x + tile_size) * per_thumb, (y + tile_size) * per_thumb)
      if c.tissue_method == 'none' or tissue.fraction_in_box(tissue_map, box) >= c.min_tissue_fraction:
        positions.append((row, col))
  return TilePlan(slide, c, level, factor, to_level0, grid, thumb, thumb_scale, tissue_map, threshold,
                  positions)
