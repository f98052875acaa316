"""Whole-slide inference with any segmenter given as `scores_fn(tiles uint8 [B, S, S, 3]) -> [B, S, S, K]`.

Per slide (outputs under `out_root/<stem>/`, see `outputs`):
  1. open the slide, take µm/px from the file (or `config.slides.slide_mpp`);
  2. thumbnail at `tissue_mpp` -> tissue mask (Otsu on saturation / optical density);
  3. read level = the coarsest at or finer than the model's µm/px; tiles of S model pixels with overlap;
     tiles with less than `min_tissue_fraction` tissue are never read nor sent to the model;
  4. host threads read, decode and resize tiles ahead of the model, in order; batches of `batch_size`
     (the last one padded);
  5. blended stitching row band by row band into a uint8 memory map at mask resolution; glass (the
     thumbnail's tissue mask, refined by each tile's own pixels at the same threshold) ->
     `background_value`;
  6. mask.tif, <stem>.geojson, overlay.png, then summary.json (the completion mark); summary.csv for all.
Steps 2-3, the tile reader and the glass gate are `tiles.plan_tiles`, shared with slide queries.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import shutil
import time
from typing import Callable, Iterator, Optional, Sequence

import ml_collections
import numpy as np
from absl import logging

from protoseg_jax import errors, prefetch
from protoseg_jax.slides import config as config_lib
from protoseg_jax.slides import outputs, reader, stitch
from protoseg_jax.slides import tiles as tiles_lib

ScoresFn = Callable[[np.ndarray], np.ndarray]
OUTPUT_FILES = ('mask.tif', 'overlay.png', '{stem}.geojson', 'summary.json')


@dataclasses.dataclass
class SlidesReport:
  """What `run_slides` did: `done` summaries, `skipped` (complete already), `failed` (path, message)."""

  done: list = dataclasses.field(default_factory=list)
  skipped: list = dataclasses.field(default_factory=list)
  failed: list = dataclasses.field(default_factory=list)
  other_process: int = 0
  summary_csv: Optional[str] = None

  @property
  def exit_code(self) -> int:
    return errors.EXIT_SOME_FAILED if self.failed else errors.EXIT_OK


def slide_stem(path: str) -> str:
  name = os.path.basename(path)
  for suffix in ('.ome.tiff', '.ome.tif'):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return os.path.splitext(name)[0]


def expand_inputs(spec: str | Sequence[str]) -> list[str]:
  """Files, folders (their slide files, sorted) and globs -> de-duplicated list of slide paths.

  Raises `DatasetError` naming an entry that does not exist or matches nothing.
  """
  entries = [spec] if isinstance(spec, str) else list(spec)
  paths: list[str] = []
  for entry in entries:
    if any(ch in entry for ch in '*?['):
      found = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
      if not found:
        raise errors.DatasetError(f'{entry}: the pattern matches no file')
    elif os.path.isdir(entry):
      found = sorted(os.path.join(entry, n) for n in os.listdir(entry)
                     if n.lower().endswith(reader.SLIDE_EXTENSIONS)
                     and os.path.isfile(os.path.join(entry, n)))
      if not found:
        raise errors.DatasetError(f'{entry}: no slide files ({", ".join(reader.SLIDE_EXTENSIONS)}) '
                                  'in the folder')
    elif os.path.isfile(entry):
      found = [entry]
    else:
      raise errors.DatasetError(f'{entry}: no such slide file or folder')
    paths.extend(p for p in found if p not in paths)
  return paths


def _outputs_complete(slide_dir: str, stem: str) -> bool:
  return all(os.path.isfile(os.path.join(slide_dir, name.format(stem=stem))) for name in OUTPUT_FILES)


class _Progress:
  def __init__(self, stem: str, total: int, every: float, callback: Optional[Callable[[dict], None]]):
    self.stem, self.total, self.every, self.callback = stem, total, every, callback
    self.start = self.last = time.perf_counter()

  def update(self, done: int, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    elapsed = max(now - self.start, 1e-9)
    rate = done / elapsed
    eta = (self.total - done) / rate if rate > 0 else float('inf')
    info = {'slide': self.stem, 'done': done, 'total': self.total, 'tiles_per_s': rate, 'eta_s': eta}
    logging.info('%s: tiles %d/%d, %.1f tiles/s, ETA %s', self.stem, done, self.total, rate,
                 f'{eta:.0f} s' if math.isfinite(eta) else '-')
    if self.callback is not None:
      self.callback(info)


def _run_batches(stream: Iterator, count: int, scores_fn: ScoresFn, stitcher: stitch.BandStitcher,
                 meter: _Progress, batch_size: int, expected: tuple[int, ...]) -> tuple[float, float, float]:
  """Batches `count` prefetched `((row, col), tile)` items through `scores_fn` into `stitcher`.

  -> (loop seconds, seconds spent waiting for input tiles, seconds inside `scores_fn`).
  """
  wait_s = model_s = 0.0
  done = 0
  start = time.perf_counter()
  images = np.zeros(expected[:3] + (3,), np.uint8)
  while done < count:
    t0 = time.perf_counter()
    batch = [next(stream) for _ in range(min(batch_size, count - done))]
    wait_s += time.perf_counter() - t0
    images[len(batch):] = 0   # the padding of a short last batch
    for i, (_, image, _) in enumerate(batch):
      images[i] = image
    t1 = time.perf_counter()
    scores = np.asarray(scores_fn(images))
    model_s += time.perf_counter() - t1
    if scores.shape != expected:
      raise ValueError(f'scores_fn returned scores of shape {scores.shape}, expected {expected}')
    for i, ((row, col), _, fraction) in enumerate(batch):
      stitcher.add(row, col, scores[i], fraction)
    done += len(batch)
    meter.update(done)
  meter.update(done, force=True)
  return time.perf_counter() - start, wait_s, model_s


def process_slide(path: str, scores_fn: ScoresFn, *, config_slides: ml_collections.ConfigDict,
                  class_names: Sequence[str], palette: np.ndarray, background_value: int, model_mpp: float,
                  tile_size: int, batch_size: int, slide_dir: str,
                  progress: Optional[Callable[[dict], None]] = None) -> dict:
  """Runs one slide end to end and writes its outputs into `slide_dir`; -> its summary dict."""
  c = config_slides
  overlap, stride = config_lib.check(c, tile_size)
  d = int(c.mask_downsample)
  num_classes = len(class_names)
  palette = np.asarray(palette, np.uint8)
  stem = slide_stem(path)
  start = time.perf_counter()
  os.makedirs(slide_dir, exist_ok=True)
  for name in os.listdir(slide_dir):   # leftovers of a killed run: memory maps and partial files
    if name.startswith('.mask-') or '.partial-' in name:
      os.remove(os.path.join(slide_dir, name))
  with reader.open_slide(path, c.reader, c.slide_mpp, c.decode_cache_mb) as slide:
    plan = tiles_lib.plan_tiles(slide, c, model_mpp, tile_size, stride)
    grid, level, tiles = plan.grid, plan.level, plan.positions
    info = slide.levels[level]
    thumb, thumb_scale, to_level0 = plan.thumb, plan.thumb_scale, plan.to_level0

    mask_path = os.path.join(slide_dir, f'.mask-{os.getpid()}.u8')
    mask = np.lib.format.open_memmap(mask_path, mode='w+', dtype=np.uint8,
                                     shape=(grid.mask_height, grid.mask_width))
    try:
      gate = tiles_lib.MaskGate(plan)

      def emit(y0, labels):
        mask[y0:y0 + labels.shape[0]] = np.where(gate.rows(y0, labels.shape[0]), labels, background_value)

      weights = stitch.importance_map(tile_size // d, c.blend, c.gaussian_sigma)
      stitcher = stitch.BandStitcher(grid, num_classes, weights, emit, background_value, gated=plan.gated)
      meter = _Progress(stem, len(tiles), c.progress_seconds, progress)
      stream = prefetch.prefetched(plan.read_tile, tiles, int(c.read_threads),
                                   int(c.read_threads + c.prefetch_batches * batch_size))
      try:
        timing = _run_batches(stream, len(tiles), scores_fn, stitcher, meter, batch_size,
                              (batch_size, tile_size, tile_size, num_classes))
      finally:
        stream.close()
      stitcher.finish()
      loop_s, wait_s, model_s = timing
      mask.flush()

      mask_mpp = model_mpp * d
      level0_per_mask_px = d * to_level0
      counts = np.zeros(256, np.int64)
      for y0 in range(0, grid.mask_height, 1024):
        counts += np.bincount(np.asarray(mask[y0:y0 + 1024]).ravel(), minlength=256)
      px_mm2 = (mask_mpp / 1000.0) ** 2
      tissue_px = int(sum(counts[v] for v in range(num_classes) if v != background_value))
      classes = [{'value': v, 'name': name, 'color': [int(x) for x in palette[v]],
                  'area_mm2': float(counts[v] * px_mm2),
                  'tissue_share': (float(counts[v] / tissue_px)
                                   if tissue_px and v != background_value else None)}
                 for v, name in enumerate(class_names)]

      outputs.write_mask_tiff(os.path.join(slide_dir, 'mask.tif'), mask, palette, mask_mpp, background_value,
                              int(c.mask_tile), class_names)
      min_area_px = c.min_polygon_area_um2 / mask_mpp ** 2
      features = outputs.geojson_features(mask, class_names, palette, background_value, level0_per_mask_px,
                                          min_area_px, c.simplify_px)
      outputs.write_geojson(os.path.join(slide_dir, f'{stem}.geojson'), features)
      _write_overlay(os.path.join(slide_dir, 'overlay.png'), slide, thumb, thumb_scale, mask,
                     level0_per_mask_px, c, palette, background_value, class_names,
                     [e['area_mm2'] for e in classes])
    finally:
      os.remove(mask_path)   # the mapping itself goes with the last reference
    seconds = time.perf_counter() - start
    summary = {
        'slide': stem, 'path': os.path.abspath(path), 'reader': slide.backend,
        'slide_mpp': slide.mpp, 'mpp_source': slide.mpp_source, 'model_mpp': model_mpp,
        'level': level, 'level_mpp': info.mpp, 'level_size': [info.width, info.height],
        'levels_mpp': [lv.mpp for lv in slide.levels], 'resize_factor': plan.factor,
        'mask_mpp': mask_mpp, 'mask_size': [grid.mask_width, grid.mask_height],
        'level0_px_per_mask_px': level0_per_mask_px, 'tile_size': tile_size, 'overlap': overlap,
        'stride': stride, 'blend': c.blend, 'tiles': len(tiles), 'tiles_total': grid.rows * grid.cols,
        'tissue_threshold': plan.tissue_threshold, 'tissue_mm2': float(tissue_px * px_mm2),
        'seconds': seconds, 'loop_seconds': loop_s, 'model_seconds': model_s,
        'tiles_per_s': len(tiles) / loop_s if loop_s > 0 else 0.0,
        'input_wait_fraction': wait_s / loop_s if loop_s > 0 else 0.0,
        'classes': classes, 'background_value': background_value,
        'outputs': [name.format(stem=stem) for name in OUTPUT_FILES],
    }
  outputs.atomic_write_json(os.path.join(slide_dir, 'summary.json'), summary)
  logging.info('%s: done in %.1f s (%d tiles of %d, level %d at %.3f µm/px, waited for input %.0f %% of '
               'the loop)', stem, seconds, len(tiles), grid.rows * grid.cols, level, info.mpp,
               100 * summary['input_wait_fraction'])
  return summary


def _write_overlay(path: str, slide: reader.Slide, thumb: np.ndarray, thumb_scale: float, mask: np.ndarray,
                   level0_per_mask_px: float, c: ml_collections.ConfigDict, palette: np.ndarray,
                   background_value: int, class_names: Sequence[str], areas_mm2: Sequence[float]) -> None:
  """overlay.png: the slide at `overlay_max_px` on its longest side (no finer than the mask, no coarser
  than the tissue thumbnail, which is reused when fine enough) with the mask sampled at its pixels."""
  from PIL import Image
  level0 = slide.levels[0]
  extent_um = max(level0.width, level0.height) * slide.mpp
  mask_mpp = level0_per_mask_px * slide.mpp
  overlay_mpp = min(max(extent_um / c.overlay_max_px, mask_mpp), thumb_scale * slide.mpp)
  if overlay_mpp < 0.9 * thumb_scale * slide.mpp:
    small, small_scale = reader.read_thumbnail(slide, overlay_mpp)
  else:
    shrink = max(1.0, max(thumb.shape[:2]) / c.overlay_max_px)
    size = (max(1, int(round(thumb.shape[1] / shrink))), max(1, int(round(thumb.shape[0] / shrink))))
    small = np.asarray(Image.fromarray(thumb).resize(size, Image.BILINEAR)) if shrink > 1 else thumb
    small_scale = thumb_scale * thumb.shape[1] / size[0]
  oh, ow = small.shape[:2]
  per_overlay = small_scale / level0_per_mask_px                       # mask px per overlay px
  my = np.minimum(((np.arange(oh) + 0.5) * per_overlay).astype(np.int64), mask.shape[0] - 1)
  mx = np.minimum(((np.arange(ow) + 0.5) * per_overlay).astype(np.int64), mask.shape[1] - 1)
  mask_small = np.asarray(mask[my[:, None], mx[None, :]])
  outputs.write_png(path, outputs.overlay_image(small, mask_small, palette, background_value, class_names,
                                                c.overlay_alpha, areas_mm2))


def run_slides(inputs: Sequence[str], scores_fn: ScoresFn, *, config_slides: ml_collections.ConfigDict,
               class_names: Sequence[str], palette, background_value: int, model_mpp: float, tile_size: int,
               batch_size: int, out_root: str, process_index: int = 0, process_count: int = 1,
               progress: Optional[Callable[[dict], None]] = None) -> SlidesReport:
  """Segments every slide of `inputs` (files, folders, globs) into `out_root/<stem>/`.

  Slides are divided between processes (slide i belongs to process i % process_count; only the owner
  writes its files). A slide whose outputs are complete is skipped (`config.slides.skip_complete`); an
  unreadable slide is reported in `failed` and the batch goes on. Errors of `scores_fn` propagate.
  Process 0 rebuilds `out_root/summary.csv` from every complete slide at the end.
  """
  config_lib.check(config_slides, tile_size)
  if not 0 <= background_value < len(class_names):
    raise errors.ConfigError(f'background value {background_value} is not a class value '
                             f'0..{len(class_names) - 1}')
  if len(palette) < len(class_names):
    raise errors.ConfigError(f'palette has {len(palette)} colours for {len(class_names)} classes')
  report = SlidesReport()
  paths = expand_inputs(inputs)
  owners: dict[str, str] = {}
  for index, path in enumerate(paths):
    stem = slide_stem(path)
    if stem in owners:
      report.failed.append((path, f'same output name {stem!r} as {owners[stem]}'))
      logging.error('%s: same output name %r as %s; skipped', path, stem, owners[stem])
      continue
    owners[stem] = path
    if index % process_count != process_index:
      report.other_process += 1
      continue
    slide_dir = os.path.join(out_root, stem)
    if config_slides.skip_complete and _outputs_complete(slide_dir, stem):
      logging.info('%s: outputs complete in %s, skipped', path, slide_dir)
      report.skipped.append(path)
      continue
    try:
      report.done.append(process_slide(
          path, scores_fn, config_slides=config_slides, class_names=class_names, palette=palette,
          background_value=background_value, model_mpp=model_mpp, tile_size=tile_size,
          batch_size=batch_size, slide_dir=slide_dir, progress=progress))
    except errors.UserError as error:
      logging.error('%s: failed: %s', path, error)
      report.failed.append((path, str(error)))
      stale = os.path.join(slide_dir, 'summary.json')
      if os.path.isfile(stale):   # an older complete run of a now-unreadable file is not "complete"
        os.remove(stale)
      if os.path.isdir(slide_dir) and not os.listdir(slide_dir):
        shutil.rmtree(slide_dir, ignore_errors=True)
  if process_index == 0:
    report.summary_csv = outputs.write_summary_csv(out_root)
  return report
