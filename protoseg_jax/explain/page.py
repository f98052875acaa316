"""A static, self-contained HTML page of the prototypes: phrases, best patches, how often each one wins.

`out_dir/index.html` with inline CSS and no script, images by relative path under `out_dir/crops/`, and
`out_dir/prototypes.json` with the same numbers. It opens from disk (file://) without a server.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from protoseg_jax.explain import colors
from protoseg_jax.explain.prototype_map import PrototypeInfo
from protoseg_jax.explain.query import slug


def crop_window(tile_hw: tuple[int, int], y: int, x: int, feature_hw: tuple[int, int],
                size: int) -> tuple[int, int]:
  """`(top, left)` in tile pixels of the `size` x `size` window of `crop_patch` (see there)."""
  height, width = int(tile_hw[0]), int(tile_hw[1])
  fh, fw = int(feature_hw[0]), int(feature_hw[1])
  if not (0 < size <= min(height, width)):
    raise ValueError(f'crop size {size} must be in 1..{min(height, width)} (the tile is {height}x{width})')
  if not (0 <= y < fh and 0 <= x < fw):
    raise ValueError(f'feature position ({y}, {x}) outside the {fh}x{fw} feature map')
  cy, cx = (y + 0.5) * height / fh, (x + 0.5) * width / fw
  top = min(max(int(math.floor(cy - size / 2 + 0.5)), 0), height - size)
  left = min(max(int(math.floor(cx - size / 2 + 0.5)), 0), width - size)
  return top, left


def crop_patch(tile: np.ndarray, y: int, x: int, feature_hw: tuple[int, int], size: int) -> np.ndarray:
  """The `[size, size, 3]` window of `tile` `[H, W, 3]` centred on feature cell `(y, x)`.

  Feature cell (y, x) of an `(h, w)` map covers tile pixels `[y*H/h, (y+1)*H/h)` (likewise x); the window is
  centred on the cell centre `((y + 0.5) * H / h, (x + 0.5) * W / w)`: its top row is
  `floor(cy - size / 2 + 0.5)`, then shifted inside the tile at the borders (clamped, never padded).

  Raises:
    ValueError: `size` larger than the tile, or `(y, x)` outside the feature map.
  """
  tile = np.asarray(tile)
  top, left = crop_window(tile.shape[:2], y, x, feature_hw, size)
  return tile[top:top + size, left:left + size]


def cell_box(tile_hw: tuple[int, int], y: int, x: int, feature_hw: tuple[int, int],
             size: int) -> tuple[float, float, float, float]:
  """Feature cell (y, x) inside its crop: `(top, left, height, width)` in crop pixels (cut at the crop)."""
  top, left = crop_window(tile_hw, y, x, feature_hw, size)
  cell_h, cell_w = tile_hw[0] / feature_hw[0], tile_hw[1] / feature_hw[1]
  y0, x0 = max(y * cell_h - top, 0.0), max(x * cell_w - left, 0.0)
  y1, x1 = min((y + 1) * cell_h - top, size), min((x + 1) * cell_w - left, size)
  return y0, x0, y1 - y0, x1 - x0


@dataclasses.dataclass(frozen=True)
class Patch:
  """One of a prototype's best patches: the crop `[s, s, 3]` uint8, its similarity and where it is from.

  `cell` = the matched feature cell inside the crop, `(top, left, height, width)` in crop pixels
  (`cell_box`); the page outlines it. None draws no outline.
  """

  image: np.ndarray
  similarity: float
  tile: int
  y: int
  x: int
  source: str = ''   # the tile's name (file), shown on hover
  cell: Optional[tuple[float, float, float, float]] = None


def collect_crops(result: Mapping[str, np.ndarray], read_tile: Callable[[int], np.ndarray],
                  feature_hw: tuple[int, int], size: int,
                  tile_name: Optional[Callable[[int], str]] = None) -> dict[int, list[Patch]]:
  """Cuts the crops of a finalized top-k (`topk.finalize`): prototype index -> its patches, best first.

  Each referenced tile is read once (`read_tile(index) -> [H, W, 3] uint8`); fillers are skipped.
  """
  tiles = np.asarray(result['tiles'])
  cache = {int(t): np.asarray(read_tile(int(t))) for t in np.unique(tiles[tiles >= 0])}
  crops = {}
  for p in range(tiles.shape[0]):
    patches = []
    for r in range(tiles.shape[1]):
      t = int(tiles[p, r])
      if t < 0:
        continue
      y, x = int(result['ys'][p, r]), int(result['xs'][p, r])
      tile = cache[t]
      patches.append(Patch(crop_patch(tile, y, x, feature_hw, size), float(result['values'][p, r]), t, y, x,
                           tile_name(t) if tile_name else '',
                           cell_box(tile.shape[:2], y, x, feature_hw, size)))
    crops[p] = patches
  return crops


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:20px auto;
padding:0 20px;color:#1d1d1f;background:#fafafa;max-width:1200px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:19px;margin:0 0 4px;display:flex;align-items:center;gap:10px}
h3{font-size:13px;margin:12px 0 2px;color:#666;font-weight:600}
table.meta{border-collapse:collapse;font-size:13px;margin:6px 0 8px}
table.meta td{padding:1px 14px 1px 0;vertical-align:top}table.meta td:first-child{color:#666}
p.help{font-size:12.5px;color:#555;max-width:900px;margin:4px 0 12px;line-height:1.4}
nav{font-size:14px;margin:0 0 14px}nav a{margin-right:14px}
section.class{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin:0 0 16px}
.classwins{font-size:13px;color:#555;font-weight:normal}
.swatch{display:inline-block;width:14px;height:14px;border-radius:3px;border:1px solid #0004;
vertical-align:-2px;flex:none;margin-right:6px}.swatch.wide{width:44px;height:16px}
.proto{display:flex;gap:12px;align-items:flex-start;padding:7px 0;border-top:1px solid #eee}
.head{flex:0 0 250px;font-size:13px;line-height:1.45}
.name{font-weight:600}.phrase{font-style:italic}.wins{display:block;color:#555;font-size:12px}
.patches{display:flex;flex-wrap:wrap;gap:8px;min-width:0}
figure{margin:0;font-size:11px;color:#444;text-align:center}
.crop{position:relative;display:block;border:1px solid #bbb;line-height:0}
.crop img{display:block}
.cell{position:absolute;border:1.5px solid #fff;outline:1px solid #000a;box-sizing:border-box}
.none{color:#999;font-size:12px;padding-top:2px}
"""

_HELP = ('Each prototype has a colour (the same as in the prototype-map PNGs). <strong>Wins</strong>: '
         'pixels of the evaluated prototype maps where this prototype is the best match among the prototypes '
         "of the pixel's class (count, share of all won pixels, share of its class's pixels). "
         '<strong>Patches</strong>: the best-matching locations over the split, at most one per tile, best '
         'first; the number under each is the similarity, the outlined square the matched feature cell.')


def _share(count: Optional[int], total: int) -> Optional[float]:
  return None if count is None or total <= 0 else count / total


def _percent(value: Optional[float]) -> str:
  """`0.2512` -> `25.1%`; below 1% two decimals (`0.04%`), below 0.01% `<0.01%` (never a false zero)."""
  if value is None:
    return '–'
  if 0 < value < 1e-4:
    return '<0.01%'
  return f'{100.0 * value:.1f}%' if value >= 0.01 else f'{100.0 * value:.2f}%'


def _count(value: Optional[int]) -> str:
  return '–' if value is None else f'{value:,}'


def _figure(name: str, patch: Patch, rank: int, element_id: str, display: int) -> str:
  """One crop with its similarity and the matched cell outlined (CSS only)."""
  height, width = np.asarray(patch.image).shape[:2]
  scale = display / max(height, width)
  shown_h, shown_w = round(height * scale), round(width * scale)
  where = f'{patch.source or "tile " + str(patch.tile)} @ feature ({patch.y}, {patch.x})'
  box = ''
  if patch.cell is not None:
    top, left, cell_h, cell_w = (v * scale for v in patch.cell)
    side_h, side_w = max(cell_h, 6.0), max(cell_w, 6.0)          # a 1-px cell stays visible
    top, left = top + (cell_h - side_h) / 2, left + (cell_w - side_w) / 2
    box = (f'<span class="cell" style="top:{top:.1f}px;left:{left:.1f}px;height:{side_h:.1f}px;'
           f'width:{side_w:.1f}px"></span>')
  return (f'<figure><span class="crop"><img src="{html.escape(name)}" width="{shown_w}" height="{shown_h}" '
          f'alt="{html.escape(element_id)} patch {rank + 1}" title="{html.escape(where)}">{box}</span>'
          f'<figcaption class="sim">{patch.similarity:.3f}</figcaption></figure>')


def write_prototype_page(out_dir: str, classes: Sequence[str], prototypes: Sequence[PrototypeInfo],
                         crops: Mapping[int, Sequence[Patch]], wins: Optional[np.ndarray],
                         meta: Mapping[str, Any], *, display_size: int = 96) -> str:
  """Writes `out_dir/index.html`, `out_dir/crops/*.png` and `out_dir/prototypes.json`; returns the HTML path.

  Args:
    classes: C class names (one section each, in order).
    prototypes: every prototype (`prototype_map.describe_prototypes`), in bank order.
    crops: prototype index -> its best patches, best first (`collect_crops`); shown for every prototype that
      has some (image prototypes; text prototypes too when given).
    wins: `[P]` pixel counts from `topk.count_wins` summed over the eval split, or None (not measured).
    meta: shown in the header and stored in the JSON, e.g. `checkpoint`, `step`, `split`, `tiles`, `level`,
      `crop_size`, `method`.
    display_size: on-page side of a crop in CSS pixels (the PNG keeps its own size).

  Share of a prototype = its wins / all prototypes' wins; class share = its wins / its class's wins.
  Layout: a header (meta, a short reading guide, links to the classes), then per class a section with its
  text prototypes (phrase) and image prototypes (patches), one row each, in bank order.
  """
  os.makedirs(os.path.join(out_dir, 'crops'), exist_ok=True)
  wins = None if wins is None else np.asarray(wins, np.int64)
  if wins is not None and len(wins) != len(prototypes):
    raise ValueError(f'{len(wins)} win counts for {len(prototypes)} prototypes')
  total = int(wins.sum()) if wins is not None else 0
  meta = {'generated': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), **meta}

  class_docs, body = [], []
  for c, class_name in enumerate(classes):
    members = [p for p in prototypes if p.class_index == c]
    class_total = int(sum(wins[p.index] for p in members)) if wins is not None else None
    entries, rows = [], {'text': [], 'image': []}
    for proto in members:
      count = None if wins is None else int(wins[proto.index])
      record = {**proto.to_json(), 'wins': count, 'share': _share(count, total),
                'class_share': _share(count, class_total or 0), 'patches': []}
      figures = []
      for rank, patch in enumerate(crops.get(proto.index, ())):
        name = f'crops/{proto.element_id}_{rank:02d}.png'
        Image.fromarray(np.asarray(patch.image, np.uint8)).save(os.path.join(out_dir, name))
        record['patches'].append({'file': name, 'similarity': float(patch.similarity), 'tile': patch.tile,
                                  'y': patch.y, 'x': patch.x, 'source': patch.source})
        figures.append(_figure(name, patch, rank, proto.element_id, display_size))
      entries.append(record)
      swatch = f'<span class="swatch" style="background:{colors.hex_color(proto.color)}"></span>'
      label = f'{"T" if proto.kind == "text" else "I"}{proto.number}'
      phrase = (f' <span class="phrase">{html.escape(proto.phrase or "(no phrase)")}</span>'
                if proto.kind == 'text' else '')
      win_text = (f'<span class="wins">wins <span class="count">{_count(count)}</span> px · '
                  f'<span class="share">{_percent(record["share"])}</span> of all · '
                  f'<span class="class-share">{_percent(record["class_share"])}</span> of '
                  f'{html.escape(class_name)}</span>')
      if figures:
        patches = f'<div class="patches">{"".join(figures)}</div>'
      else:
        patches = '' if proto.kind == 'text' else '<div class="none">no patch (no tile seen)</div>'
      rows[proto.kind].append(
          f'<div class="proto {proto.kind}" id="{proto.element_id}" data-index="{proto.index}" '
          f'data-kind="{proto.kind}"><div class="head">{swatch}<span class="name">{label}</span>{phrase}'
          f'{win_text}</div>{patches}</div>')
    section_id = f'class-{slug(class_name)}'
    class_docs.append({'name': class_name, 'index': c, 'id': section_id, 'wins': class_total,
                       'share': _share(class_total, total), 'prototypes': entries})
    # The class swatch: its prototypes' colours, dark to light.
    shades = sorted((p.color for p in members), key=lambda rgb: colors.rgb_to_oklab(np.asarray(rgb) / 255)[0])
    shades = (shades * 2)[:max(len(shades), 2)] if shades else [(153, 153, 153)] * 2   # >= 2 colour stops
    gradient = ','.join(colors.hex_color(rgb) for rgb in shades)
    parts = [f'<section class="class" id="{section_id}" data-class="{html.escape(class_name)}">',
             f'<h2><span class="swatch wide" style="background:linear-gradient(90deg,{gradient})"></span>'
             f'{html.escape(class_name)}'
             f' <span class="classwins">wins <span class="count">{_count(class_total)}</span> px · '
             f'<span class="share">{_percent(_share(class_total, total))}</span> of all</span></h2>']
    for kind, heading in (('text', 'Text prototypes (phrase)'), ('image', 'Image prototypes')):
      if rows[kind]:
        parts += [f'<h3>{heading} · {len(rows[kind])}</h3>', *rows[kind]]
    parts.append('</section>')
    body.append('\n'.join(parts))

  meta_rows = ''.join(f'<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>'
                      for k, v in meta.items())
  nav = ''.join(f'<a href="#class-{slug(name)}">{html.escape(name)}</a>' for name in classes)
  title = f'Prototypes · {meta.get("method", "model")}'
  page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<meta name="viewport" content="width=device-width,initial-scale=1">'
          f'<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n'
          f'<header><h1>{html.escape(title)}</h1><table class="meta">{meta_rows}</table>'
          f'<p class="help">{_HELP}</p></header>\n'
          f'<nav>{nav}</nav>\n' + '\n'.join(body) + '\n</body></html>\n')
  path = os.path.join(out_dir, 'index.html')
  with open(path, 'w', encoding='utf-8') as handle:
    handle.write(page)
  with open(os.path.join(out_dir, 'prototypes.json'), 'w') as handle:
    document = {'meta': meta, 'total_wins': total if wins is not None else None, 'classes': class_docs}
    json.dump(document, handle, indent=1, allow_nan=False, default=str)
  return path
