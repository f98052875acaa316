"""`config.slides`: schema and defaults of whole-slide inference (merged into every method's config).

Importable without the `slides` extra (only `ml_collections`), so every config can carry the block.

Resolutions: the model works at `config.data.mpp` µm/px ("model resolution"); tiles of the model's size
are cut at that resolution, and the class mask is written `mask_downsample` times coarser.
"""

from __future__ import annotations

import ml_collections

from protoseg_jax.errors import ConfigError

BLENDS = ('gaussian', 'mean')
TISSUE_METHODS = ('saturation', 'od', 'none')
READERS = ('auto', 'tifffile', 'openslide')


def slides_config() -> ml_collections.ConfigDict:
  """Defaults of `config.slides` (every key documented inline)."""
  c = ml_collections.ConfigDict()
  # Reading.
  c.reader = 'auto'                # 'auto' (TIFF family: tifffile; .ndpi/.mrxs/...: OpenSlide) | 'tifffile'
  #                                  | 'openslide'
  c.slide_mpp = 0.0                # µm/px of level 0, used only when the file states none (> 0 to use)
  c.mpp_tolerance = 0.02           # a level up to 2 % coarser than the model still counts as "at or finer"
  c.read_threads = 4               # host threads reading + decoding + resizing tiles ahead of the model
  c.prefetch_batches = 3           # batches of tiles read ahead (memory: this x batch x tile bytes)
  c.decode_cache_mb = 64.0         # decoded slide tiles kept for overlapping reads (tifffile reader)
  # Tiling and stitching (sizes in pixels at the model's resolution).
  c.overlap = 0.25                 # tile overlap as a fraction of the tile size (stride = tile - overlap)
  c.blend = 'gaussian'             # 'gaussian' (importance map, sigma = gaussian_sigma x tile) | 'mean'
  c.gaussian_sigma = 0.125         # of the tile size (nnU-Net's 1/8)
  c.mask_downsample = 4            # mask pixel = 4 x 4 model pixels; must divide the tile size and stride
  # Tissue detection: Otsu on a low-resolution copy picks the tiles and the threshold; the same threshold on
  # each tile's own pixels gives the glass edge at mask resolution.
  c.tissue_method = 'saturation'   # 'saturation' (HSV S) | 'od' (mean optical density) | 'none' (all tissue)
  c.tissue_mpp = 8.0               # µm/px of the low-resolution tissue mask
  c.tissue_threshold = 0.0         # > 0: fixed threshold on the measure; 0: Otsu's threshold
  c.tissue_min_threshold = 0.05    # floor of the Otsu threshold (keeps glass noise out on tissue-free slides)
  c.tissue_min_area_um2 = 2000.0   # tissue pieces smaller than this (dust, debris) are glass
  c.min_tissue_fraction = 0.05     # a tile with less tissue than this is not sent to the model
  # Outputs.
  c.min_polygon_area_um2 = 200.0   # polygons and holes smaller than this are dropped (specks)
  c.simplify_px = 0.25             # polygon simplification tolerance in mask pixels (0.25 keeps areas exact)
  c.mask_tile = 512                # TIFF tile size of mask.tif
  c.overlay_max_px = 2048          # longest side of overlay.png (never finer than the mask)
  c.overlay_alpha = 0.45
  c.skip_complete = True           # skip slides whose outputs are complete (resume an interrupted batch)
  c.progress_seconds = 10.0        # seconds between progress lines
  return c


def check(config_slides: ml_collections.ConfigDict, tile_size: int) -> tuple[int, int]:
  """Validates `config.slides` for a model tile size; -> (overlap px, stride px) at model resolution."""
  c = config_slides
  if c.reader not in READERS:
    raise ConfigError(f'config.slides.reader={c.reader!r}: expected one of {READERS}')
  if c.blend not in BLENDS:
    raise ConfigError(f'config.slides.blend={c.blend!r}: expected one of {BLENDS}')
  if c.tissue_method not in TISSUE_METHODS:
    raise ConfigError(f'config.slides.tissue_method={c.tissue_method!r}: expected one of {TISSUE_METHODS}')
  d = int(c.mask_downsample)
  if d < 1 or tile_size % d:
    raise ConfigError(f'config.slides.mask_downsample={c.mask_downsample} must be >= 1 and divide the tile '
                      f'size {tile_size}')
  if not 0.0 <= c.overlap < 1.0:
    raise ConfigError(f'config.slides.overlap={c.overlap} must be a fraction in [0, 1)')
  overlap = int(round(c.overlap * tile_size / d)) * d   # a whole number of mask pixels
  stride = tile_size - overlap
  if stride <= 0:
    raise ConfigError(f'config.slides.overlap={c.overlap} leaves no stride for tile size {tile_size}')
  if c.min_tissue_fraction < 0 or c.min_tissue_fraction > 1:
    raise ConfigError(f'config.slides.min_tissue_fraction={c.min_tissue_fraction} must be in [0, 1]')
  if c.tissue_mpp <= 0:
    raise ConfigError(f'config.slides.tissue_mpp={c.tissue_mpp} must be > 0')
  if c.read_threads < 1 or c.prefetch_batches < 1:
    raise ConfigError('config.slides.read_threads and config.slides.prefetch_batches must be >= 1')
  if c.mask_tile % 16 or c.mask_tile < 16:
    raise ConfigError(f'config.slides.mask_tile={c.mask_tile} must be a positive multiple of 16 (TIFF tiles)')
  return overlap, stride
