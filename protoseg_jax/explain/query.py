"""Free-text queries: cosine-similarity maps of phrases over tiles, their statistics, and pictures of them.

Method-agnostic: the model side supplies unit pixel features of one level `[B, h, w, c]` and unit phrase
features `[Q, c]` in the same space (for DualProtoSeg: the phrase's text feature through the text
projection and that level's prototype projection, L2-normalised, exactly like a text prototype).

* `format_phrases` checks the `--text` phrases and applies the prompt template (one-line `ConfigError`s).
* `similarity_maps` (jit): `[B, h, w, Q]` cosine in f32, optionally resized to the tile size.
* `phrase_statistics` (jit, on the device): per input and phrase, max, mean and the fraction of tissue
  pixels above a threshold, all over the tissue pixels; only `[B, Q]` values come back to the host.
  `combine_statistics` (host) merges them over many inputs (a slide's tiles), exactly.
* `heatmap_overlay`, `terminology_sheet`, `write_query_outputs` (host, NumPy + Pillow): overlays per input
  and phrase, one comparison sheet per input with a shared colour scale, and `query.json`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import string
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from protoseg_jax import ops
from protoseg_jax.errors import ConfigError
from protoseg_jax.explain import colors, drawing

TEMPLATE_KEY = 'config.query.template'


# ----------------------------------------------------------------------------------------------- phrases


def check_template(template: Optional[str]) -> None:
  """Raises `ConfigError` unless `template` is empty or has exactly one `{}` field (`{{`, `}}`: braces)."""
  if not template:
    return
  try:
    fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
              if name is not None]
  except ValueError as error:
    raise ConfigError(f'{TEMPLATE_KEY} {template!r} is not a valid template ({error}); '
                      "write one '{}' where the phrase goes") from None
  if fields != [('', '', None)]:
    found = ', '.join('{' + name + (f'!{conv}' if conv else '') + (f':{spec}' if spec else '') + '}'
                      for name, spec, conv in fields) or 'none'
    raise ConfigError(f"{TEMPLATE_KEY} {template!r} must have exactly one '{{}}' field where the phrase "
                      f'goes (found: {found})')


def format_phrases(phrases: Sequence[str], template: Optional[str], tokenizer: Any,
                   max_tokens: int) -> list[str]:
  """Stripped phrases, put into `template`, each checked to fit the text tower.

  Args:
    phrases: the `--text` values in command-line order (positions are reported 1-based: `--text #2`).
    template: e.g. `'a histopathology image of {}'`; empty or None uses the phrase as is.
    tokenizer: anything with `encode(text) -> list[int]` (no special tokens).
    max_tokens: the most tokens `encode(prompt)` may return (the text tower's context minus what the model
      adds around the phrase: BOS/EOS, learned context vectors).

  Returns:
    The prompts, one per phrase, in order.

  Raises:
    ConfigError: no phrase, an empty phrase, a bad template, or a prompt longer than `max_tokens`.
  """
  check_template(template)
  if not phrases:
    raise ConfigError('no --text phrase given: pass at least one, e.g. --text="tumor necrosis"')
  prompts = []
  for position, phrase in enumerate(phrases, start=1):
    phrase = str(phrase).strip()
    if not phrase:
      raise ConfigError(f'--text #{position} is empty')
    prompt = template.format(phrase) if template else phrase
    count = len(tokenizer.encode(prompt))
    if count > max_tokens:
      raise ConfigError(f'--text #{position} {phrase!r} is {count} tokens long after the template; the text '
                        f'tower takes at most {max_tokens}')
    prompts.append(prompt)
  return prompts


# ------------------------------------------------------------------------------------------------ arrays


@functools.partial(jax.jit, static_argnames=('out_hw', 'align_corners'))
def similarity_maps(pixel_features: jax.Array, phrase_features: jax.Array,
                    out_hw: Optional[tuple[int, int]] = None, align_corners: bool = True) -> jax.Array:
  """Cosine similarity of every pixel with every phrase.

  Args:
    pixel_features: `[B, h, w, c]`, unit vectors per pixel (any float dtype, e.g. bf16).
    phrase_features: `[Q, c]`, unit rows.
    out_hw: static `(H, W)`: bilinear resize of the maps to the tile size (`ops.resize_bilinear`); None
      keeps `(h, w)`.
    align_corners: resize convention; True like the CAM-to-mask post-processing (`cam.postprocess_pass`).

  Returns:
    `[B, H, W, Q]` float32 (products accumulated in f32 whatever the input dtype).
  """
  sims = jnp.einsum('bhwc,qc->bhwq', pixel_features, phrase_features.astype(pixel_features.dtype),
                    preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
  if out_hw is not None:
    sims = ops.resize_bilinear(sims, (int(out_hw[0]), int(out_hw[1])), align_corners=align_corners)
  return sims


@jax.jit
def phrase_statistics(sims: jax.Array, tissue: Optional[jax.Array], threshold: float) -> dict[str, jax.Array]:
  """Per input and phrase, over that input's tissue pixels (jit; `threshold` is traced, no retrace).

  Args:
    sims: `[B, H, W, Q]` similarity maps.
    tissue: `[B, H, W]` bool (True = tissue) at the maps' size, or None for every pixel.
    threshold: similarity above which (strictly) a tissue pixel counts as a hit.

  Returns:
    `max`, `mean`, `fraction_above`: `[B, Q]` float32 (NaN for an input without tissue pixels);
    `tissue_pixels`: `[B]` int32.
  """
  sims = sims.astype(jnp.float32)
  if tissue is None:
    tissue = jnp.ones(sims.shape[:3], bool)
  weight = tissue.astype(bool)[..., None]
  count = jnp.sum(tissue.astype(jnp.int32), axis=(1, 2))
  denominator = jnp.maximum(count, 1).astype(jnp.float32)[:, None]
  empty = (count == 0)[:, None]
  nan = jnp.float32(jnp.nan)
  maximum = jnp.max(jnp.where(weight, sims, -jnp.inf), axis=(1, 2))
  mean = jnp.sum(jnp.where(weight, sims, 0.0), axis=(1, 2)) / denominator
  above = jnp.sum((weight & (sims > threshold)).astype(jnp.float32), axis=(1, 2)) / denominator
  return {'max': jnp.where(empty, nan, maximum), 'mean': jnp.where(empty, nan, mean),
          'fraction_above': jnp.where(empty, nan, above), 'tissue_pixels': count}


def combine_statistics(stats: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Per-input statistics `[N, Q]` (concatenate batches first) -> over all inputs together `[Q]` (host).

  Exactly the statistics of the union of the inputs' tissue pixels (a slide made of tiles): max of the
  maxima, and mean / fraction above weighted by each input's tissue pixel count; inputs without tissue
  are skipped (NaN when none has any). `tissue_pixels` becomes the total.
  """
  count = np.asarray(stats['tissue_pixels'], np.float64)
  has = count > 0
  total = count[has].sum()
  out = {'tissue_pixels': np.int64(total)}
  if not has.any():
    nan = np.full(np.asarray(stats['max']).shape[1:], np.nan)
    return {**out, 'max': nan, 'mean': nan.copy(), 'fraction_above': nan.copy()}
  weights = count[has][:, None] / total
  out['max'] = np.max(np.asarray(stats['max'], np.float64)[has], axis=0)
  out['mean'] = np.sum(weights * np.asarray(stats['mean'], np.float64)[has], axis=0)
  out['fraction_above'] = np.sum(weights * np.asarray(stats['fraction_above'], np.float64)[has], axis=0)
  return out


def tissue_mask(tiles: np.ndarray, white_level: int = 220, min_spread: int = 18) -> np.ndarray:
  """A simple foreground mask: `[..., H, W, 3]` uint8 -> `[..., H, W]` bool.

  A pixel is tissue unless it is near-white glass: every channel >= `white_level` and the channel spread
  (max - min) below `min_spread`. A predicted or annotated background class is better when available.
  """
  tiles = np.asarray(tiles, np.int16)
  white = np.all(tiles >= white_level, axis=-1) & (np.ptp(tiles, axis=-1) < min_spread)
  return ~white


# -------------------------------------------------------------------------------------------- rendering


def heatmap_overlay(tile: np.ndarray, sim: np.ndarray, value_range: tuple[float, float], alpha: float = 0.6,
                    tissue: Optional[np.ndarray] = None) -> np.ndarray:
  """Tile `[H, W, 3]` uint8 blended with the colour-mapped similarity `[H, W]` -> `[H, W, 3]` uint8.

  `(1 - alpha) * tile + alpha * colour(sim)` on tissue pixels; pixels outside `tissue` keep the tile.
  """
  tile = np.asarray(tile, np.uint8)
  sim = np.asarray(sim)
  if tile.shape[:2] != sim.shape:
    raise ValueError(f'tile {tile.shape[:2]} and similarity map {sim.shape} differ in size: resize the maps '
                     'to the tile size (similarity_maps(..., out_hw=...))')
  blend = (1.0 - alpha) * tile.astype(np.float32) + alpha * colors.apply_lut(sim, value_range)
  blend = np.clip(np.round(blend), 0, 255).astype(np.uint8)
  if tissue is not None:
    blend = np.where(np.asarray(tissue, bool)[..., None], blend, tile)
  return blend


def _format(value: float) -> str:
  return 'n/a' if value is None or not math.isfinite(value) else f'{value:.3f}'


def sheet_value_range(sims: np.ndarray, tissue: Optional[np.ndarray] = None) -> tuple[float, float]:
  """`(min, max)` of `sims` `[H, W, Q]` over the tissue pixels (all pixels without a mask or tissue)."""
  sims = np.asarray(sims, np.float64)
  if tissue is not None and np.asarray(tissue).any():
    sims = sims[np.asarray(tissue, bool)]
  return float(np.min(sims)), float(np.max(sims))


def terminology_sheet(tile: np.ndarray, sims: np.ndarray, phrases: Sequence[str],
                      stats: Mapping[str, Sequence[float]], *, title: str = '',
                      value_range: Optional[tuple[float, float]] = None, tissue: Optional[np.ndarray] = None,
                      alpha: float = 0.6, panel: int = 224, input_label: Optional[str] = None) -> np.ndarray:
  """One input compared across phrases: `[rows, cols, 3]` uint8 RGB picture.

  Left: the tile; then one heatmap overlay per phrase, all on ONE colour scale (`value_range`, default the
  min/max over this input's tissue pixels and all phrases), with the phrase and its max/mean under each;
  right: the colour bar with its scale.

  Args:
    tile: `[H, W, 3]` uint8.
    sims: `[H, W, Q]` similarity maps at the tile size.
    phrases: Q labels (the phrases as typed).
    stats: `max` and `mean`, Q values each (this input's row of `phrase_statistics`).
    title: the heading line (e.g. the input's name and the level).
    value_range: `(lo, hi)` of the colour scale, or None (see above).
    tissue: `[H, W]` bool; outside it the tile is shown without colour.
    alpha: heatmap opacity over the tile.
    panel: width of each panel in pixels (the tile is resized to it; a non-square input, e.g. a slide
      thumbnail, keeps its aspect ratio, its height at most 2 x panel).
    input_label: caption of the first panel (default 'tile' for a square input, else 'image').
  """
  sims = np.asarray(sims, np.float32)
  if sims.ndim != 3 or sims.shape[-1] != len(phrases):
    raise ValueError(f'sims must be [H, W, Q] with Q = {len(phrases)} phrases, got {sims.shape}')
  lo, hi = sheet_value_range(sims, tissue) if value_range is None else value_range
  margin, gap, bar_w = 16, 12, 18
  face, small, big = drawing.font(15), drawing.font(13), drawing.font(17)
  measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  caption_lines = max(len(drawing.wrap(measure, p, face, panel, 2)) for p in phrases)
  caption_h = 20 * caption_lines + 22
  title_h = 30 if title else 0
  tile_h, tile_w = np.asarray(tile).shape[:2]
  panel_h = panel if tile_h == tile_w else max(1, min(2 * panel, round(panel * tile_h / tile_w)))
  columns = 1 + len(phrases)
  width = 2 * margin + columns * panel + (columns - 1) * gap + gap + bar_w + 70
  height = 2 * margin + title_h + panel_h + 8 + caption_h
  sheet = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  if title:
    draw.text((margin, margin), drawing.fit(draw, title, big, width - 2 * margin), fill=(20, 20, 20),
              font=big)
  top = margin + title_h

  def place(array: np.ndarray, column: int) -> int:
    left = margin + column * (panel + gap)
    picture = Image.fromarray(array)
    if picture.size != (panel, panel_h):
      picture = picture.resize((panel, panel_h), Image.BILINEAR)
    sheet.paste(picture, (left, top))
    draw.rectangle([left - 1, top - 1, left + panel, top + panel_h], outline=(160, 160, 160))
    return left

  left = place(np.asarray(tile, np.uint8), 0)
  input_label = input_label or ('tile' if tile_h == tile_w else 'image')
  draw.text((left, top + panel_h + 8), input_label, fill=(90, 90, 90), font=face)
  for q, phrase in enumerate(phrases):
    left = place(heatmap_overlay(tile, sims[..., q], (lo, hi), alpha, tissue), q + 1)
    y = top + panel_h + 8
    for line in drawing.wrap(draw, phrase, face, panel, 2):
      draw.text((left, y), line, fill=(20, 20, 20), font=face)
      y += 20
    summary = f'max {_format(stats["max"][q])}   mean {_format(stats["mean"][q])}'
    draw.text((left, y + 2), summary, fill=(70, 70, 70), font=small)
  # Colour bar: high at the top.
  bar_left = margin + columns * (panel + gap)
  ramp = colors.similarity_lut()[::-1][np.linspace(0, 255, panel_h).round().astype(int)]
  sheet.paste(Image.fromarray(np.repeat(ramp[:, None, :], bar_w, axis=1)), (bar_left, top))
  draw.rectangle([bar_left - 1, top - 1, bar_left + bar_w, top + panel_h], outline=(160, 160, 160))
  for fraction, value in ((0.0, hi), (0.5, 0.5 * (lo + hi)), (1.0, lo)):
    y = top + round(fraction * (panel_h - 1))
    draw.line([bar_left + bar_w, y, bar_left + bar_w + 4, y], fill=(60, 60, 60))
    draw.text((bar_left + bar_w + 7, min(max(y - 7, top - 4), top + panel_h - 12)), f'{value:.3f}',
              fill=(40, 40, 40), font=small)
  draw.text((bar_left, top + panel_h + 8), 'cosine', fill=(90, 90, 90), font=small)
  return np.asarray(sheet)


def slug(text: str, limit: int = 40) -> str:
  """A file-name-safe form of `text`: lower case, runs of other characters -> `_`."""
  return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')[:limit] or 'x'


def _json_number(value) -> Optional[float]:
  value = float(value)
  return value if math.isfinite(value) else None


def write_input_outputs(out_dir: str, position: int, name: str, tile: np.ndarray, sims: np.ndarray,
                        phrases: Sequence[str], prompts: Sequence[str], stats: Mapping[str, Any], *,
                        level: Any, tissue: Optional[np.ndarray] = None,
                        value_range: Optional[tuple[float, float]] = None, alpha: float = 0.6,
                        panel: int = 224, input_label: Optional[str] = None) -> dict:
  """One input's overlays and terminology sheet under `out_dir/NNNN_<name>/`; -> its `query.json` record.

  Args:
    position: NNNN, the input's position (equal names cannot collide).
    tile: `[H, W, 3]` uint8; sims: `[H, W, Q]` maps at its size; tissue: `[H, W]` bool or None.
    stats: this input's `max`, `mean`, `fraction_above` (Q values each) and `tissue_pixels`.
    value_range: the colour scale, or None for the min/max over its tissue pixels and all phrases.
    panel, input_label: the sheet's panel width and first caption (`terminology_sheet`).
  """
  mask = None if tissue is None else np.asarray(tissue, bool)
  sims = np.asarray(sims, np.float32)
  scale = sheet_value_range(sims, mask) if value_range is None else tuple(value_range)
  folder = f'{position:04d}_{slug(os.path.splitext(os.path.basename(name))[0])}'
  os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
  entries = []
  for q, phrase in enumerate(phrases):
    overlay_file = f'{folder}/overlay_{q:02d}_{slug(phrase)}.png'
    Image.fromarray(heatmap_overlay(tile, sims[..., q], scale, alpha, mask)).save(
        os.path.join(out_dir, overlay_file))
    entries.append({'text': phrase, 'prompt': prompts[q], 'max': _json_number(stats['max'][q]),
                    'mean': _json_number(stats['mean'][q]),
                    'fraction_above': _json_number(stats['fraction_above'][q]), 'overlay': overlay_file})
  sheet = terminology_sheet(tile, sims, phrases, {k: stats[k] for k in ('max', 'mean')},
                            title=f'{name} · cosine similarity, {_level_text(level)}', value_range=scale,
                            tissue=mask, alpha=alpha, panel=panel, input_label=input_label)
  sheet_file = f'{folder}/sheet.png'
  Image.fromarray(sheet).save(os.path.join(out_dir, sheet_file))
  return {'name': name, 'tissue_pixels': int(stats['tissue_pixels']),
          'value_range': [float(scale[0]), float(scale[1])], 'sheet': sheet_file, 'phrases': entries}


def _level_text(level: Any) -> str:
  return f'level {level}' if isinstance(level, (int, np.integer)) else str(level)


def write_query_json(out_dir: str, records: Sequence[dict], phrases: Sequence[str], prompts: Sequence[str],
                     stats: Mapping[str, np.ndarray], *, threshold: float, level: Any, statistics_over: str,
                     meta: Optional[Mapping[str, Any]] = None) -> str:
  """`out_dir/query.json`: the phrases, `meta`, `overall` (`combine_statistics(stats)`, `stats` `[N, Q]` of
  all N inputs) and the inputs' `records` (`write_input_outputs`); -> its path."""
  overall = combine_statistics(stats)
  document = {'similarity': 'cosine', 'level': level, 'threshold': float(threshold),
              'statistics_over': statistics_over,
              'phrases': [{'text': p, 'prompt': t} for p, t in zip(phrases, prompts)],
              **dict(meta or {}),
              'overall': {'tissue_pixels': int(overall['tissue_pixels']),
                          'phrases': [{'text': p, **{k: _json_number(overall[k][q])
                                                     for k in ('max', 'mean', 'fraction_above')}}
                                      for q, p in enumerate(phrases)]},
              'inputs': list(records)}
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'query.json')
  with open(path + '.tmp', 'w') as handle:
    json.dump(document, handle, indent=1, allow_nan=False)
  os.replace(path + '.tmp', path)
  return path


def write_query_outputs(out_dir: str, names: Sequence[str], tiles: np.ndarray, sims: np.ndarray,
                        phrases: Sequence[str], prompts: Sequence[str], stats: Mapping[str, np.ndarray], *,
                        threshold: float, level: Any, tissue: Optional[np.ndarray] = None,
                        value_range: Optional[tuple[float, float]] = None, alpha: float = 0.6,
                        meta: Optional[Mapping[str, Any]] = None) -> str:
  """Writes overlays, one terminology sheet per input and `query.json` under `out_dir`; returns the JSON path.

  Layout: `out_dir/NNNN_<name>/overlay_QQ_<phrase>.png`, `out_dir/NNNN_<name>/sheet.png`, `out_dir/query.json`
  (NNNN = position of the input, so equal names cannot collide). `query.json` also holds `overall`: the
  statistics over all inputs together (`combine_statistics`). Streams of inputs: `write_input_outputs` per
  input, then `write_query_json`.

  Args:
    names: B input names (tile file names, slide region names).
    tiles: `[B, H, W, 3]` uint8.
    sims: `[B, H, W, Q]` maps at the tile size (`similarity_maps(..., out_hw=(H, W))`).
    phrases: the Q phrases as typed (stripped); prompts: the Q prompts actually encoded (after the template).
    stats: `phrase_statistics(sims, tissue, threshold)` as host arrays.
    threshold: the threshold used for `fraction_above`; level: the feature level the maps come from.
    tissue: `[B, H, W]` bool or None; value_range: a fixed colour scale for every sheet and overlay, or
      None for one scale per input (min/max over its tissue pixels and all phrases).
    meta: extra keys for `query.json` (checkpoint, step, template).
  """
  tiles, sims = np.asarray(tiles), np.asarray(sims, np.float32)
  if sims.shape[:3] != tiles.shape[:3] or sims.shape[-1] != len(phrases) or len(names) != len(tiles):
    raise ValueError(f'inconsistent shapes: {len(names)} names, tiles {tiles.shape}, sims {sims.shape}, '
                     f'{len(phrases)} phrases')
  os.makedirs(out_dir, exist_ok=True)
  stats = {key: np.asarray(value) for key, value in stats.items()}
  records = [write_input_outputs(out_dir, b, name, tiles[b], sims[b], phrases, prompts,
                                 {key: value[b] for key, value in stats.items()}, level=level,
                                 tissue=None if tissue is None else tissue[b], value_range=value_range,
                                 alpha=alpha)
             for b, name in enumerate(names)]
  return write_query_json(out_dir, records, phrases, prompts, stats, threshold=threshold, level=level,
                          statistics_over='tissue pixels' if tissue is not None else 'all pixels', meta=meta)
