"""Explanations of a trained model, for any method with the capabilities (`Method.query_fn`, ...):

  --mode=query --text=PHRASE [--text=...] --input=TILES|SLIDES   cosine maps of free phrases
  --mode=prototypes --split=train|val                            the prototype page (best patches, wins)
  config.predict.prototype_map                                   predict's winning-prototype maps

Query: the phrases are checked and templated first (`prepare_query`, one-line errors before any checkpoint is
read), tokenised as class prompts (`Method.phrase_token_ids`), and every batch of tiles goes through ONE
jitted call (`Method.query_fn` + the bilinear resize to the tile, align_corners=True) for all phrases. Images
of any size are cut into windows every `config.eval.stride` pixels and their maps stitched by the mean
(`inference.stitched_scores`); statistics are over the tissue pixels of `explain.query.tissue_mask` (RGB
rule: not near-white glass). Outputs: `OUT/NNNN_<name>/{overlay_QQ_<phrase>,sheet}.png`, `OUT/query.json`.
A whole slide streams through the slide package's reader, tissue detection and tiling (`config.slides`):
tile maps are blended at mask resolution band by band (`slides.stitch.BandStitcher`), statistics are exact
over the mask's tissue pixels, and the heatmaps are written at thumbnail resolution (block means, longest
side <= `config.slides.overlay_max_px`): `OUT/slides/<stem>/...` with its own `query.json`.

Prototypes: one streamed pass over the split, batches of `config.eval.batch_size` on the mesh like
evaluation; the top-k state (`explain.topk`) stays on the device, updated in the same jitted call as the
similarities (`Method.patch_similarities_fn`, positions of a prototype whose class the tile's known label
excludes set to -inf). Images larger than a tile are cut into non-overlapping windows (the last flush with
the border), each its own "tile". Wins: prototype maps (`Method.prototype_map_fn('eval')`, labels from the
ground truth as evaluation gates) over `config.data.eval_split`, counted on the device for tile sets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from protoseg_jax import inference, ops, predict, prefetch, sharding
from protoseg_jax.data import images as images_lib
from protoseg_jax.errors import ConfigError, DatasetError
from protoseg_jax.explain import page as page_lib, prototype_map as prototype_map_lib, topk
from protoseg_jax.explain import query as query_lib

INPUT_KINDS = ('auto', 'tiles', 'slides')
_EMPTY = 255   # stitcher label of mask pixels no tile covers (more phrases than this are refused)
MAX_PHRASES = 64


# ------------------------------------------------------------------------------------------------ query


@dataclasses.dataclass(frozen=True)
class QueryRequest:
  """Checked phrases: as typed (stripped), as encoded (after the template), and their token ids `[Q, L]`."""

  phrases: list[str]
  prompts: list[str]
  token_ids: np.ndarray


def prepare_query(method, config, texts: Sequence[str]) -> QueryRequest:
  """Checks `--text` and `config.query` (template, context, level) -> the request; one-line `ConfigError`s."""
  if len(texts) > MAX_PHRASES:
    raise ConfigError(f'{len(texts)} --text phrases: at most {MAX_PHRASES} per run')
  tokenizer, max_tokens = method.query_tokenizer()
  prompts = query_lib.format_phrases(texts, config.query.template, tokenizer, max_tokens)
  method.query_fn()   # checks config.query.context / level before any checkpoint is read
  check_input_kind(config.query.input_kind)
  return QueryRequest([str(text).strip() for text in texts], prompts,
                      np.asarray(method.phrase_token_ids(prompts), np.int32))


def check_input_kind(kind: str) -> None:
  if kind not in INPUT_KINDS:
    raise ConfigError(f'config.query.input_kind={kind!r} must be one of {", ".join(INPUT_KINDS)}')


def is_slide_file(path: str) -> bool:
  """Whole-slide formats by extension; a `.tif` / `.tiff` is a slide when its first page is tiled or it has
  pyramid levels (ordinary image TIFFs are stripped, single-level)."""
  from protoseg_jax.slides import reader  # pylint: disable=g-import-not-at-top
  lower = path.lower()
  if lower.endswith(reader.OPENSLIDE_EXTENSIONS + ('.svs', '.btf', '.tf8', '.qptiff', '.ome.tif',
                                                   '.ome.tiff')):
    return True
  if not lower.endswith(('.tif', '.tiff')):
    return False
  try:
    import tifffile  # pylint: disable=g-import-not-at-top
    with tifffile.TiffFile(path) as tiff:
      return bool(tiff.pages[0].is_tiled or len(tiff.series[0].levels) > 1)
  except Exception:  # pylint: disable=broad-except  (no tifffile, or not a TIFF it reads: an image then)
    return False


def query_inputs(spec: str, kind: str) -> tuple[list[str], list[str]]:
  """`--input` -> (image paths, slide paths) by `config.query.input_kind`."""
  from protoseg_jax.slides import reader  # pylint: disable=g-import-not-at-top
  check_input_kind(kind)
  if not spec:
    raise DatasetError('no input: pass --input=FOLDER|GLOB|FILE (tiles, images or whole slides)')
  if kind == 'tiles':
    return predict.expand_inputs(spec), []
  extensions = tuple(dict.fromkeys(predict.IMAGE_EXTENSIONS + reader.SLIDE_EXTENSIONS))
  paths = predict.expand_inputs(spec, extensions)
  if kind == 'slides':
    return [], paths
  slides = [path for path in paths if is_slide_file(path)]
  return [path for path in paths if path not in slides], slides


def query_call(method, config, evaluator, params, extra, token_ids: np.ndarray) -> tuple[Callable, int]:
  """-> (`tiles uint8 [B, S, S, 3] -> cosine maps [B, S, S, Q]` float32 NumPy, B): one jitted call per batch
  for all phrases (the method's maps resized to the tile, bilinear with align_corners=True)."""
  query_fn, size = method.query_fn(), config.data.image_size
  batch_size = int(config.query.get('batch_size', 0)) or evaluator.batch_size
  sharding.check_global_batch(batch_size, evaluator.mesh, 'config.query.batch_size')

  def maps_fn(params, extra, statics, phrase_ids, images):
    maps = query_fn(params, extra, statics, phrase_ids, images)
    return ops.resize_bilinear(maps, (size, size), align_corners=True)

  jitted = evaluator.jit_batch_fn(maps_fn, shared=1, batch=1)
  statics = evaluator.statics(params, extra)
  phrase_ids = jax.device_put(jnp.asarray(token_ids), sharding.replicated(evaluator.mesh))

  def call(tiles: np.ndarray) -> np.ndarray:
    placed = evaluator.place({'images': np.asarray(tiles, np.uint8)})
    maps = jitted(params, extra, statics, phrase_ids, placed['images'])
    return np.asarray(jax.device_get(maps), np.float32)

  return call, batch_size


def _statistics_row(sims: np.ndarray, tissue: Optional[np.ndarray], threshold: float) -> dict:
  """`phrase_statistics` of one `[H, W, Q]` map -> host values (`[Q]` each, `tissue_pixels` scalar)."""
  stats = query_lib.phrase_statistics(jnp.asarray(sims)[None], None if tissue is None else
                                      jnp.asarray(tissue)[None], threshold)
  return {key: np.asarray(jax.device_get(value))[0] for key, value in stats.items()}


def run_query(method, config, evaluator, params, extra, request: QueryRequest, images: Sequence[str],
              slides: Sequence[str], out_dir: str, meta: dict, write: bool = True) -> dict:
  """Writes the query outputs of `images` (tiles or images of any size) and `slides`; -> a summary."""
  call, batch_size = query_call(method, config, evaluator, params, extra, request.token_ids)
  level, threshold = method.query_level_name(), float(config.query.threshold)
  alpha = float(config.query.get('alpha', 0.6))
  meta = {'method': method.name, **meta, 'template': config.query.template, 'context': config.query.context}
  summary = {'images': 0, 'slides': []}
  if write:
    os.makedirs(out_dir, exist_ok=True)
  if images:
    start = time.perf_counter()
    size = config.data.image_size
    stride = config.eval.get('stride', 0) or size
    kept: dict[int, np.ndarray] = {}

    def stream() -> Iterator[np.ndarray]:
      for index, image in enumerate(prefetch.prefetched(images_lib.read_image, images,
                                                        config.data.get('decode_threads', 4))):
        kept[index] = image
        yield image

    labels = np.zeros((len(images), 1), np.int32)   # the query does not use labels
    records, rows = [], []
    for index, sims in inference.stitched_scores(lambda windows, _: call(windows), stream(), labels, size,
                                                 stride, batch_size):
      image = kept.pop(index)
      tissue = query_lib.tissue_mask(image)
      row = _statistics_row(sims, tissue, threshold)
      rows.append(row)
      if write:
        records.append(query_lib.write_input_outputs(out_dir, index, os.path.basename(images[index]), image,
                                                     sims, request.phrases, request.prompts, row, level=level,
                                                     tissue=tissue, alpha=alpha))
    stats = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    if write:
      summary['query_json'] = query_lib.write_query_json(
          out_dir, records, request.phrases, request.prompts, stats, threshold=threshold, level=level,
          statistics_over='tissue pixels (not near-white glass)',
          meta={**meta, 'input_root': os.path.commonpath([os.path.abspath(p) for p in images])})
    summary['images'] = len(images)
    logging.info('query: %d images x %d phrases in %.1f s', len(images), len(request.phrases),
                 time.perf_counter() - start)
  for path in slides:
    summary['slides'].append(_query_one_slide(path, call, batch_size, method, config, request, out_dir, meta,
                                              level, threshold, alpha, write))
  return summary


# -------------------------------------------------------------------------------------------- slides


@dataclasses.dataclass
class SlideQuery:
  """A slide's stitched query: the heatmap at thumbnail resolution and exact statistics at mask resolution."""

  thumbnail: np.ndarray   # [h, w, 3] uint8, the slide at the heatmap's resolution
  heat: np.ndarray        # [h, w, Q] float32, mean cosine over each block's tissue mask pixels
  tissue: np.ndarray      # [h, w] bool, blocks that are mostly tissue
  stats: dict             # max / mean / fraction_above [Q], tissue_pixels (mask pixels)
  info: dict              # resolutions, sizes, tiles


def query_slide(path: str, call: Callable[[np.ndarray], np.ndarray], *, config_slides, model_mpp: float,
                tile_size: int, batch_size: int, num_phrases: int, threshold: float,
                max_px: int) -> SlideQuery:
  """Streams the tissue tiles of a slide through `call` (`[B, S, S, 3] -> [B, S, S, Q]`) as `--mode=slides`
  does (level choice, tissue detection, tile selection, overlap, Gaussian / mean blending and the glass gate
  at mask resolution, all from `config.slides`), with similarity maps in place of class scores."""
  # pylint: disable=g-import-not-at-top
  from protoseg_jax.slides import config as slides_config, reader, stitch, tiles as tiles_lib
  # pylint: enable=g-import-not-at-top
  c = config_slides
  _, stride = slides_config.check(c, tile_size)
  d = int(c.mask_downsample)
  with reader.open_slide(path, c.reader, c.slide_mpp, c.decode_cache_mb) as slide:
    plan = tiles_lib.plan_tiles(slide, c, model_mpp, tile_size, stride)
    grid, positions, gate = plan.grid, plan.positions, tiles_lib.MaskGate(plan)
    block = max(1, math.ceil(max(grid.mask_width, grid.mask_height) / max(int(max_px), 1)))
    out_h, out_w = math.ceil(grid.mask_height / block), math.ceil(grid.mask_width / block)
    heat_sum = np.zeros((out_h, out_w, num_phrases), np.float64)
    heat_count = np.zeros((out_h, out_w), np.int64)
    maximum = np.full(num_phrases, -np.inf)
    total, above, count = np.zeros(num_phrases), np.zeros(num_phrases, np.int64), 0
    held: dict[int, np.ndarray] = {}

    def scores_out(y0: int, blended: np.ndarray) -> None:
      held[y0] = blended

    def emit(y0: int, labels: np.ndarray) -> None:
      nonlocal maximum, count
      blended = held.pop(y0)
      height = labels.shape[0]
      keep = gate.rows(y0, height) & (labels != _EMPTY)
      values = blended[keep].astype(np.float64)                      # [n, Q]
      if len(values):
        maximum = np.maximum(maximum, values.max(axis=0))
        total[:] += values.sum(axis=0)
        above[:] += (values > threshold).sum(axis=0)
        count += len(values)
      pad = out_w * block - keep.shape[1]
      weights = np.pad(keep, ((0, 0), (0, pad))).astype(np.float64)
      weighted = np.pad(blended, ((0, 0), (0, pad), (0, 0))) * weights[..., None]
      target = (y0 + np.arange(height)) // block
      np.add.at(heat_sum, target, weighted.reshape(height, out_w, block, num_phrases).sum(axis=2))
      np.add.at(heat_count, target, weights.reshape(height, out_w, block).sum(axis=2).astype(np.int64))

    weights = stitch.importance_map(tile_size // d, c.blend, c.gaussian_sigma)
    stitcher = stitch.BandStitcher(grid, num_phrases, weights, emit, _EMPTY, scores_out=scores_out,
                                   gated=plan.gated)
    tiles = np.zeros((batch_size, tile_size, tile_size, 3), np.uint8)
    stream = prefetch.prefetched(plan.read_tile, positions, int(c.read_threads),
                                 int(c.read_threads + c.prefetch_batches * batch_size))
    start = time.perf_counter()
    for first in range(0, len(positions), batch_size):
      batch = [next(stream) for _ in range(min(batch_size, len(positions) - first))]
      tiles[len(batch):] = 0
      for i, (_, image, _) in enumerate(batch):
        tiles[i] = image
      sims = call(tiles)
      for i, ((row, col), _, fraction) in enumerate(batch):
        stitcher.add(row, col, sims[i], fraction)
    stitcher.finish()
    seconds = time.perf_counter() - start
    mask_mpp = model_mpp * d
    picture, _ = reader.read_thumbnail(slide, mask_mpp * block)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  picture = np.asarray(Image.fromarray(picture).resize((out_w, out_h), Image.BILINEAR))
  heat = (heat_sum / np.maximum(heat_count, 1)[..., None]).astype(np.float32)
  nan = np.full(num_phrases, np.nan)
  stats = {'max': maximum if count else nan, 'mean': total / count if count else nan,
           'fraction_above': above / count if count else nan, 'tissue_pixels': np.int64(count)}
  info = {'slide_mpp': slide.mpp, 'model_mpp': model_mpp, 'slide_level': plan.level, 'mask_mpp': mask_mpp,
          'mask_size': [grid.mask_width, grid.mask_height], 'heatmap_mpp': mask_mpp * block,
          'heatmap_size': [out_w, out_h], 'tiles': len(positions), 'tiles_total': grid.rows * grid.cols,
          'tissue_mm2': float(count * (mask_mpp / 1000.0) ** 2), 'model_seconds': seconds}
  return SlideQuery(picture, heat, heat_count * 2 >= block * block, stats, info)


def _query_one_slide(path, call, batch_size, method, config, request, out_dir, meta, level, threshold, alpha,
                     write) -> dict:
  from protoseg_jax.slides import run as slides_run  # pylint: disable=g-import-not-at-top
  stem = slides_run.slide_stem(path)
  result = query_slide(path, call, config_slides=config.slides, model_mpp=config.data.mpp,
                       tile_size=config.data.image_size, batch_size=batch_size,
                       num_phrases=len(request.phrases), threshold=threshold,
                       max_px=int(config.slides.overlay_max_px))
  slide_dir = os.path.join(out_dir, 'slides', stem)
  if write:
    record = query_lib.write_input_outputs(slide_dir, 0, stem, result.thumbnail, result.heat, request.phrases,
                                           request.prompts, result.stats, level=level, tissue=result.tissue,
                                           alpha=alpha, panel=384, input_label='slide (tissue only)')
    query_lib.write_query_json(
        slide_dir, [record], request.phrases, request.prompts,
        {key: np.asarray(value)[None] for key, value in result.stats.items()}, threshold=threshold,
        level=level, statistics_over='tissue pixels of the slide mask (mask resolution); the heatmaps are '
        'block means at heatmap_mpp', meta={**meta, 'slide': stem, 'path': os.path.abspath(path),
                                             **result.info})
  logging.info('query: slide %s, %d tiles, heatmap %dx%d', stem, result.info['tiles'],
               *result.info['heatmap_size'])
  return {'slide': stem, 'dir': slide_dir, **result.info}


# -------------------------------------------------------------------------------------- prototype maps


def prototype_map_call(method, evaluator, params, extra, context: str) -> Callable:
  """`(windows uint8 [B, S, S, 3], labels [B, C]) -> [B, S, S]` int32 NumPy on the mesh."""
  jitted = evaluator.jit_batch_fn(method.prototype_map_fn(context), batch=2)
  statics = evaluator.statics(params, extra)

  def call(windows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    placed = evaluator.place({'images': windows, 'labels': np.asarray(labels, np.int32)})
    return np.asarray(jax.device_get(jitted(params, extra, statics, placed['images'], placed['labels'])))

  return call


def write_prototype_maps(method, config, evaluator, params, extra, paths: Sequence[str], output_dir: str,
                         write: bool = True) -> str:
  """predict's prototype maps: `<out>/prototype_maps/<stem>.png` (palette index = prototype, 255 =
  background) and `prototype_legend.{png,json}`; windows every `config.eval.stride` pasted. -> the folder."""
  infos = method.prototype_infos()
  folder = os.path.join(output_dir, 'prototype_maps')
  palette = np.asarray([info.color for info in infos], np.uint8)
  if write:
    prototype_map_lib.write_legend(folder, infos)
  size = config.data.image_size
  labels = np.stack([method.image_labels(path) for path in paths])     # as predict's masks are gated
  call = prototype_map_call(method, evaluator, params, extra, 'predict')
  images = prefetch.prefetched(images_lib.read_image, paths, config.data.get('decode_threads', 4))
  stride = config.eval.get('stride', 0) or size
  for index, proto_map in inference.pasted_maps(call, images, labels, size, stride, config.eval.batch_size,
                                                prototype_map_lib.BACKGROUND):
    if write:
      stem = os.path.splitext(os.path.basename(paths[index]))[0]
      prototype_map_lib.write_prototype_map_png(os.path.join(folder, stem + '.png'), proto_map, palette)
  return folder


# ------------------------------------------------------------------------------------- prototype page


def _windows_of(shape: tuple[int, int], size: int) -> list[tuple[int, int]]:
  """Non-overlapping window corners of an image (the last flush with the border; one if it is smaller)."""
  return [(y, x) for y in inference.window_starts(max(shape[0], size), size, size)
          for x in inference.window_starts(max(shape[1], size), size, size)]


def _cut(image: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
  if image.shape[0] < size or image.shape[1] < size:
    canvas = np.zeros((max(image.shape[0], size), max(image.shape[1], size), 3), np.uint8)
    canvas[:image.shape[0], :image.shape[1]] = image
    image = canvas
  return np.ascontiguousarray(image[y:y + size, x:x + size])


def topk_pass(method, config, evaluator, params, extra, source, class_of: np.ndarray,
              k: int) -> tuple[dict, list[tuple[int, int, int]], tuple[int, int]]:
  """One streamed pass over `source` (`Method.explain_images`) -> (`topk.finalize` result, tile index ->
  (image, y, x), the feature map's `(h, w)`). Batches of `config.eval.batch_size` tiles on the mesh; the
  state is replicated on the device and updated in the same jitted call as the similarities."""
  size, batch_size = config.data.image_size, evaluator.batch_size
  patch_fn = method.patch_similarities_fn()
  class_of = jnp.asarray(class_of, jnp.int32)

  def step(params, extra, statics, images, labels, tile_ids, valid, state):
    sims = patch_fn(params, extra, statics, images)                           # [B, h, w, P]
    known = labels.shape[1]
    label = jnp.take(labels, jnp.minimum(class_of, known - 1), axis=1)        # [B, P]
    allowed = (label != 0) | (class_of >= known)[None, :]                     # 0 = the class is absent
    sims = jnp.where(allowed[:, None, None, :], sims, -jnp.inf)
    return topk.update(state, sims, tile_ids, valid)

  replicated, batch = sharding.replicated(evaluator.mesh), sharding.batch_sharding(evaluator.mesh)
  in_shardings = ((evaluator.param_shardings, evaluator.extra_shardings, replicated) + (batch,) * 4
                  + (replicated,))
  jitted = sharding.jit_sharded(step, evaluator.mesh, config.sharding.logical_rules,
                                in_shardings=in_shardings, out_shardings=replicated, donate_argnums=(7,))
  statics = evaluator.statics(params, extra)
  images_shape = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8)
  feature_hw = tuple(jax.eval_shape(patch_fn, params, extra, statics, images_shape).shape[1:3])
  state = jax.device_put(topk.init_state(len(class_of), k), replicated)
  tiles: list[tuple[int, int, int]] = []
  rows: list[tuple[np.ndarray, np.ndarray, int]] = []
  num_labels = None

  def dispatch():
    nonlocal state
    count = len(rows)
    images = np.zeros((batch_size, size, size, 3), np.uint8)
    labels = np.zeros((batch_size, num_labels), np.int32)
    tile_ids = np.full((batch_size,), -1, np.int32)
    for row, (image, label, tile_id) in enumerate(rows):
      images[row], labels[row], tile_ids[row] = image, label, tile_id
    valid = np.arange(batch_size) < count
    placed = evaluator.place({'images': images, 'labels': labels, 'tile_ids': tile_ids, 'valid': valid})
    state = jitted(params, extra, statics, placed['images'], placed['labels'], placed['tile_ids'],
                   placed['valid'], state)
    rows.clear()

  start = time.perf_counter()
  loaded = prefetch.prefetched(source.read, list(range(len(source))), config.data.get('decode_threads', 4))
  for index, (image, label) in enumerate(loaded):
    label = np.asarray(label, np.int32).reshape(-1)
    num_labels = num_labels or max(len(label), 1)
    for y, x in _windows_of(image.shape[:2], size):
      tiles.append((index, y, x))
      rows.append((_cut(image, y, x, size), label[:num_labels], len(tiles) - 1))
      if len(rows) == batch_size:
        dispatch()
  if rows:
    dispatch()
  result = topk.finalize(state)
  logging.info('top-%d pass: %d images, %d tiles in %.1f s', k, len(source), len(tiles),
               time.perf_counter() - start)
  return result, tiles, feature_hw


def count_eval_wins(method, config, evaluator, params, extra, eval_set, num_prototypes: int) -> np.ndarray:
  """`[P]` int64 pixels won by each prototype in the prototype maps of `eval_set` (labels as evaluation):
  counted on the device for a tile set, on the host from the pasted windows otherwise."""
  from protoseg_jax import evaluation  # pylint: disable=g-import-not-at-top
  size, batch_size = config.data.image_size, evaluator.batch_size
  wins = np.zeros(num_prototypes, np.int64)
  if evaluation.is_tile_set(eval_set, size):
    map_fn = method.prototype_map_fn('eval')

    def count(params, extra, statics, images, labels, valid):
      return topk.count_wins(map_fn(params, extra, statics, images, labels), valid, num_prototypes)

    jitted = evaluator.jit_batch_fn(count, batch=3)
    statics = evaluator.statics(params, extra)
    counts = []
    for first in range(0, len(eval_set.images), batch_size):
      index = np.arange(first, first + batch_size)
      valid = index < len(eval_set.images)
      images = np.zeros((batch_size, size, size, 3), np.uint8)
      labels = np.zeros((batch_size, eval_set.labels.shape[1]), np.int32)
      for row in np.flatnonzero(valid):
        images[row], labels[row] = eval_set.images[index[row]], eval_set.labels[index[row]]
      placed = evaluator.place({'images': images, 'labels': labels, 'valid': valid})
      counts.append(jitted(params, extra, statics, placed['images'], placed['labels'], placed['valid']))
    for value in counts:
      wins += np.asarray(jax.device_get(value), np.int64)
    return wins
  call = prototype_map_call(method, evaluator, params, extra, 'eval')
  for _, proto_map in inference.pasted_maps(call, eval_set.images, eval_set.labels, size,
                                            config.eval.get('stride', 0) or size, batch_size,
                                            prototype_map_lib.BACKGROUND):
    values = proto_map[(proto_map >= 0) & (proto_map < num_prototypes)]
    wins += np.bincount(values.ravel(), minlength=num_prototypes)[:num_prototypes]
  return wins


def run_prototypes(method, config, workdir: str, evaluator, params, extra, split: str, out_dir: str,
                   meta: dict, write: bool = True) -> str:
  """The prototype page of `split`: `out_dir/index.html`, `crops/`, `prototypes.json`; -> the HTML path."""
  infos = method.prototype_infos()
  explain = config.explain
  size, k = config.data.image_size, int(explain.top_k)
  crop = min(int(explain.crop_size), size)
  if crop < int(explain.crop_size):
    logging.warning('config.explain.crop_size=%d is larger than the %d-px tile: crops of %d px',
                    explain.crop_size, size, crop)
  source = method.explain_images(workdir, split)
  if not len(source):
    raise DatasetError(f'--mode=prototypes: split {split!r} has no images')
  class_of = np.asarray([info.class_index for info in infos], np.int32)
  result, tiles, feature_hw = topk_pass(method, config, evaluator, params, extra, source, class_of, k)
  windowed = any((y, x) != (0, 0) for _, y, x in tiles) or len(tiles) != len(source)

  def read_tile(tile: int) -> np.ndarray:
    index, y, x = tiles[tile]
    return _cut(source.read(index)[0], y, x, size)

  def tile_name(tile: int) -> str:
    index, y, x = tiles[tile]
    return f'{source.names[index]} @ ({y}, {x})' if windowed else source.names[index]

  crops = page_lib.collect_crops(result, read_tile, feature_hw, crop, tile_name)
  wins, wins_split = None, None
  if explain.get('wins', True):
    wins_split = config.data.eval_split
    eval_set = method.eval_set(workdir, wins_split, 0, 1)
    wins = count_eval_wins(method, config, evaluator, params, extra, eval_set, len(infos))
  classes = []
  for info in infos:
    if info.class_name not in classes:
      classes.append(info.class_name)
  page_meta = {'method': method.name, **meta, 'split': split, 'images': len(source), 'tiles': len(tiles),
               'level': explain.level, 'feature map': f'{feature_hw[0]} x {feature_hw[1]}', 'top k': k,
               'crop size': crop, 'wins split': wins_split or 'not measured'}
  path = os.path.join(out_dir, 'index.html')
  if write:
    path = page_lib.write_prototype_page(out_dir, classes, infos, crops, wins, page_meta,
                                         display_size=int(explain.get('display_size', 96)))
    prototype_map_lib.write_legend(out_dir, infos)
  return path
