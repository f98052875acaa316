"""Prototype maps: which prototype of the pixel's class explains each pixel best, and how to draw it.

Prototypes are grouped class-major like the bank: class c owns `[c*G, (c+1)*G)`, G = prototypes per class.
DualProtoSeg's interleaved bank has G = 2M and, inside a group, text prototypes at even positions (phrase
j = position // 2) and image prototypes at odd positions (number j = position // 2); `describe_prototypes`
takes that pattern as `group_kinds`, so other layouts (text only, image only) work the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from protoseg_jax.data.bcss import write_palette_png
from protoseg_jax.explain import colors, drawing

BACKGROUND = -1          # prototype_map value of pixels outside every tissue class
BACKGROUND_INDEX = 255   # ... and their palette index in the PNG
KINDS = ('text', 'image')


@functools.partial(jax.jit, static_argnames=('num_classes', 'prototypes_per_class'))
def prototype_map(cams: jax.Array, mask: jax.Array, num_classes: int, prototypes_per_class: int) -> jax.Array:
  """The winning prototype of each pixel's class.

  Args:
    cams: `[B, H, W, P]` per-prototype activations (any float dtype), P = num_classes * prototypes_per_class.
    mask: `[B, H, W]` int class per pixel (prediction or ground truth) at the same size; values outside
      `0..num_classes-1` (the background value, ignore labels) are not explained.
    num_classes, prototypes_per_class: static; C and G.

  Returns:
    `[B, H, W]` int32: for a pixel of class c, the global index in `[c*G, (c+1)*G)` of the prototype with the
    largest activation in class c's group (ties -> the lowest index, as `argmax`); `BACKGROUND` (-1) for
    every other pixel.
  """
  group = prototypes_per_class
  if cams.shape[-1] != num_classes * group:
    raise ValueError(f'cams have {cams.shape[-1]} prototypes, expected {num_classes} classes x {group}')
  if cams.shape[:3] != mask.shape:
    raise ValueError(f'cams {cams.shape[:3]} and mask {mask.shape} differ: resize the CAMs to the mask size')
  grouped = cams.reshape(*cams.shape[:3], num_classes, group)
  winner = jnp.argmax(grouped, axis=-1).astype(jnp.int32)                      # [B, H, W, C]
  mask = mask.astype(jnp.int32)
  tissue = (mask >= 0) & (mask < num_classes)
  safe = jnp.where(tissue, mask, 0)
  local = jnp.take_along_axis(winner, safe[..., None], axis=-1)[..., 0]
  return jnp.where(tissue, safe * group + local, BACKGROUND).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PrototypeInfo:
  """What one prototype is: `index` in the bank, its class, kind ('text'/'image'), `number` j within its
  class and kind, the `phrase` of a text prototype, and its map colour."""

  index: int
  class_index: int
  class_name: str
  kind: str
  number: int
  phrase: Optional[str]
  color: tuple[int, int, int]

  @property
  def element_id(self) -> str:
    """Stable HTML/JSON id: `proto-<index>`."""
    return f'proto-{self.index:03d}'

  @property
  def label(self) -> str:
    """Short label: `T3 · pleomorphic nuclei` or `I3`."""
    prefix = f'{"T" if self.kind == "text" else "I"}{self.number}'
    return f'{prefix} · {self.phrase}' if self.phrase else prefix

  def to_json(self) -> dict:
    return {'index': self.index, 'id': self.element_id, 'class': self.class_name,
            'class_index': self.class_index, 'kind': self.kind, 'number': self.number, 'phrase': self.phrase,
            'color': colors.hex_color(self.color)}


def interleaved_kinds(phrases_per_class: int) -> tuple[str, ...]:
  """DualProtoSeg's group pattern: `('text', 'image') * M`."""
  return ('text', 'image') * phrases_per_class


def describe_prototypes(class_names: Sequence[str], group_kinds: Sequence[str],
                        phrases: Optional[Sequence[Sequence[str]]] = None,
                        palette: Optional[np.ndarray] = None) -> list[PrototypeInfo]:
  """One `PrototypeInfo` per prototype, in bank order.

  Args:
    class_names: C names.
    group_kinds: the kind at each position of a class's group (length G), e.g. `interleaved_kinds(10)`.
    phrases: per class, the phrases of its text prototypes in order (`phrases[c][j]` for text number j).
    palette: `[C*G, 3]` uint8 (default `colors.prototype_palette(C, G)`).
  """
  group = len(group_kinds)
  if any(kind not in KINDS for kind in group_kinds):
    raise ValueError(f'group_kinds must hold {KINDS}, got {tuple(group_kinds)}')
  palette = colors.prototype_palette(len(class_names), group) if palette is None else np.asarray(palette)
  if len(palette) < len(class_names) * group:
    raise ValueError(f'palette has {len(palette)} colours for {len(class_names) * group} prototypes')
  infos = []
  for c, name in enumerate(class_names):
    seen = {kind: 0 for kind in KINDS}
    for g, kind in enumerate(group_kinds):
      number = seen[kind]
      seen[kind] += 1
      phrase = None
      if kind == 'text' and phrases is not None:
        if number >= len(phrases[c]):
          raise ValueError(f'class {name!r} has {len(phrases[c])} phrases, its group needs {seen["text"]}+')
        phrase = phrases[c][number]
      index = c * group + g
      infos.append(PrototypeInfo(index, c, name, kind, number, phrase, tuple(int(v) for v in palette[index])))
  return infos


def map_palette(palette: np.ndarray) -> np.ndarray:
  """`[256, 3]` PNG palette: rows 0..P-1 the prototype colours, row 255 the background colour."""
  palette = np.asarray(palette, np.uint8)
  if len(palette) > BACKGROUND_INDEX:
    raise ValueError(f'{len(palette)} prototypes do not fit an 8-bit palette PNG (at most 255)')
  full = np.zeros((256, 3), np.uint8)
  full[:len(palette)] = palette
  full[BACKGROUND_INDEX] = colors.BACKGROUND_COLOR
  return full


def write_prototype_map_png(path: str, proto_map: np.ndarray, palette: np.ndarray) -> None:
  """Indexed PNG of one `[H, W]` prototype map: pixel value = prototype index, 255 = background."""
  proto_map = np.asarray(proto_map)
  indices = np.where(proto_map < 0, BACKGROUND_INDEX, proto_map).astype(np.uint8)
  write_palette_png(path, indices, map_palette(palette))


def legend_image(infos: Sequence[PrototypeInfo], row_height: int = 20, column_width: int = 300) -> np.ndarray:
  """`[h, w, 3]` uint8 legend: one column per class, one row per prototype (swatch, label)."""
  classes = sorted({info.class_index for info in infos})
  by_class = {c: [info for info in infos if info.class_index == c] for c in classes}
  rows = max(len(v) for v in by_class.values())
  face, bold = drawing.font(13), drawing.font(15)
  width, height = 12 + column_width * len(classes), 38 + (rows + 1) * row_height + 8
  picture = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(picture)
  for column, c in enumerate(classes):
    left = 12 + column * column_width
    draw.text((left, 10), by_class[c][0].class_name, fill=(20, 20, 20), font=bold)
    for row, info in enumerate(by_class[c]):
      top = 38 + row * row_height
      draw.rectangle([left, top, left + 28, top + row_height - 5], fill=info.color, outline=(120, 120, 120))
      text = f'{info.index:>3}  {info.kind:<5} {info.label}'
      draw.text((left + 36, top + 1), drawing.fit(draw, text, face, column_width - 44), fill=(30, 30, 30),
                font=face)
  top = 38 + rows * row_height + 4
  draw.rectangle([12, top, 40, top + row_height - 5], fill=colors.BACKGROUND_COLOR, outline=(120, 120, 120))
  draw.text((48, top + 1), f'{BACKGROUND_INDEX}  background / not a tissue class (map value {BACKGROUND})',
            fill=(30, 30, 30), font=face)
  return np.asarray(picture)


def write_legend(out_dir: str, infos: Sequence[PrototypeInfo],
                 stem: str = 'prototype_legend') -> tuple[str, str]:
  """Writes `<stem>.png` and `<stem>.json` (palette index -> class, kind, phrase/number, colour)."""
  os.makedirs(out_dir, exist_ok=True)
  png, js = os.path.join(out_dir, f'{stem}.png'), os.path.join(out_dir, f'{stem}.json')
  Image.fromarray(legend_image(infos)).save(png)
  document = {'background': {'value': BACKGROUND, 'png_index': BACKGROUND_INDEX,
                             'color': colors.hex_color(colors.BACKGROUND_COLOR)},
              'prototypes': [info.to_json() for info in infos]}
  with open(js, 'w') as handle:
    json.dump(document, handle, indent=1)
  return png, js
