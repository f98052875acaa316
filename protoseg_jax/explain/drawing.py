"""Text on pictures: DejaVu Sans when installed (wide Unicode coverage), else Pillow's bundled font.

Pillow's bundled scalable font needs no system files but covers ASCII only (no accented letters), so
phrases like "café-au-lait" would show boxes; DejaVu Sans (Debian `fonts-dejavu-core`, pulled in by most
desktop packages) is used when Pillow finds it in the system font folders.
"""

from __future__ import annotations

import functools

from PIL import ImageDraw, ImageFont

PREFERRED_FONT = 'DejaVuSans.ttf'


@functools.lru_cache(maxsize=16)
def font(size: int) -> ImageFont.ImageFont:
  """A scalable font at `size` pixels (see the module docstring for which)."""
  try:
    return ImageFont.truetype(PREFERRED_FONT, size)
  except OSError:
    return ImageFont.load_default(size)


def fit(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> str:
  """`text`, cut with an ellipsis if wider than `width` pixels."""
  if draw.textlength(text, font=face) <= width:
    return text
  while text and draw.textlength(text + '…', font=face) > width:
    text = text[:-1]
  return text + '…'


def wrap(draw: ImageDraw.ImageDraw, text: str, face, width: int, max_lines: int) -> list[str]:
  """Greedy word wrap to `width` pixels, at most `max_lines` (the last one ends in an ellipsis if cut)."""
  lines, current = [], ''
  for word in text.split():
    trial = f'{current} {word}'.strip()
    if draw.textlength(trial, font=face) <= width or not current:
      current = trial
    else:
      lines.append(current)
      current = word
  lines.append(current)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] += ' …'
  return [fit(draw, line, face, width) for line in lines]
