"""Images of any size through a fixed-tile model: sliding windows, batching across images, stitching.

The model side is `scores_call(windows uint8 [B, S, S, 3], labels int32 [B, C]) -> [B, S, S, K]` (B fixed:
the last batch is padded, so it compiles once). Each image is cut into S x S windows every `stride` pixels
(the last flush with the border; an image smaller than a window is zero-padded), windows of consecutive
images share batches, and each image's scores are the (optionally weighted) mean of its windows' scores
(`stitched_scores`; evaluation of images larger than a tile, predict, queries) or its windows' integer maps
pasted in order (`pasted_maps`; prototype maps).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from protoseg_jax import ops


def window_starts(length: int, window: int, stride: int) -> list[int]:
  """Start offsets covering `[0, length)` with windows of `window` every `stride`, the last flush with the
  end (one window at 0 when the image is not longer than the window)."""
  if stride <= 0:
    raise ValueError(f'config.eval.stride must be positive, got {stride}')
  if length <= window:
    return [0]
  starts = list(range(0, length - window + 1, stride))
  if starts[-1] != length - window:
    starts.append(length - window)
  return starts


def resize_scores(scores: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
  """Bilinear (align_corners=False) resize of `[H, W, K]` scores, e.g. back to the size of a mask."""
  if scores.shape[:2] == tuple(out_hw):
    return scores
  rows = ops.bilinear_matrix(scores.shape[0], out_hw[0], False)
  cols = ops.bilinear_matrix(scores.shape[1], out_hw[1], False)
  return np.einsum('oh,hwc,pw->opc', rows, scores, cols).astype(np.float32)


@dataclasses.dataclass
class _Pending:
  """One image being assembled: its canvas state (made from its first window's output) and the windows
  still to come."""

  shape: tuple[int, int]
  remaining: int
  state: Any = None


def _windowed(call: Callable[[np.ndarray, np.ndarray], np.ndarray], images: Iterable[np.ndarray],
              labels: np.ndarray, window: int, stride: int, batch_size: int,
              new_state: Callable[[tuple[int, int], np.ndarray], Any],
              add: Callable[[Any, int, int, np.ndarray], None],
              finish: Callable[[Any, int, int], np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
  """The windows of every image (zero-padded to a window if smaller) in batches of exactly `batch_size`
  through `call`; each image's outputs go into a state (`new_state(canvas_hw, first output)`,
  `add(state, y, x, output)`), and `(index, finish(state, height, width))` is yielded in image order as
  soon as the image is complete."""
  pending: dict[int, _Pending] = {}
  batch_windows, batch_labels, batch_where = [], [], []

  def flush() -> Iterator[tuple[int, np.ndarray]]:
    count = len(batch_windows)
    windows = np.stack(batch_windows + [batch_windows[0]] * (batch_size - count))
    window_labels = np.stack(batch_labels + [batch_labels[0]] * (batch_size - count))
    outputs = np.asarray(call(windows, window_labels))[:count]
    for (index, y, x), output in zip(batch_where, outputs):
      entry = pending[index]
      if entry.state is None:
        entry.state = new_state((max(entry.shape[0], window), max(entry.shape[1], window)), output)
      add(entry.state, y, x, output)
      entry.remaining -= 1
    batch_windows.clear()
    batch_labels.clear()
    batch_where.clear()
    for index in sorted(pending):
      entry = pending[index]
      if entry.remaining:
        break
      yield index, finish(entry.state, *entry.shape)
      del pending[index]

  for index, image in enumerate(images):
    height, width = image.shape[:2]
    canvas = image
    if height < window or width < window:
      canvas = np.zeros((max(height, window), max(width, window), 3), np.uint8)
      canvas[:height, :width] = image
    corners = [(y, x) for y in window_starts(canvas.shape[0], window, stride)
               for x in window_starts(canvas.shape[1], window, stride)]
    pending[index] = _Pending((height, width), len(corners))
    for y, x in corners:
      batch_windows.append(np.ascontiguousarray(canvas[y:y + window, x:x + window]))
      batch_labels.append(np.asarray(labels[index], np.int32))
      batch_where.append((index, y, x))
      if len(batch_windows) == batch_size:
        yield from flush()
  if batch_windows:
    yield from flush()


def stitched_scores(scores_call: Callable[[np.ndarray, np.ndarray], np.ndarray], images: Iterable[np.ndarray],
                    labels: np.ndarray, window: int, stride: int, batch_size: int,
                    window_weight: Optional[np.ndarray] = None) -> Iterator[tuple[int, np.ndarray]]:
  """Yields `(index, scores [H, W, K] float32)` for every image, in order, as soon as it is complete.

  Args:
    scores_call: the model (see the module docstring); called with exactly `batch_size` windows.
    images: uint8 `[H_i, W_i, 3]` images of any size.
    labels: `[N, C]` int32 image-level labels (-1 unknown), shared by all windows of an image.
    window: S, the model's tile size; stride: window step (`window` = no overlap).
    window_weight: optional `[S, S]` blending weight (e.g. a Gaussian importance map); default uniform.
  """
  weight = np.ones((window, window), np.float32) if window_weight is None else np.asarray(window_weight,
                                                                                           np.float32)

  def new_state(hw: tuple[int, int], output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(hw + output.shape[-1:], np.float32), np.zeros(hw + (1,), np.float32)

  def add(state, y: int, x: int, output: np.ndarray) -> None:
    total, weights = state
    total[y:y + window, x:x + window] += output.astype(np.float32) * weight[..., None]
    weights[y:y + window, x:x + window, 0] += weight

  def finish(state, height: int, width: int) -> np.ndarray:
    total, weights = state
    return (total / np.maximum(weights, 1e-12))[:height, :width]

  return _windowed(scores_call, images, labels, window, stride, batch_size, new_state, add, finish)


def pasted_maps(map_call: Callable[[np.ndarray, np.ndarray], np.ndarray], images: Iterable[np.ndarray],
                labels: np.ndarray, window: int, stride: int, batch_size: int,
                fill: int) -> Iterator[tuple[int, np.ndarray]]:
  """`(index, [H, W] int32)` per image, in order: `map_call(windows [B, S, S, 3], labels [B, C]) -> [B, S, S]`
  on the same windows as `stitched_scores`, each window's map pasted over the earlier ones (no blending;
  `fill` where no window lands, which the windows' cover leaves nowhere inside the image)."""

  def new_state(hw: tuple[int, int], output: np.ndarray) -> np.ndarray:
    del output
    return np.full(hw, fill, np.int32)

  def add(canvas: np.ndarray, y: int, x: int, output: np.ndarray) -> None:
    canvas[y:y + window, x:x + window] = output

  return _windowed(map_call, images, labels, window, stride, batch_size, new_state, add,
                   lambda canvas, height, width: canvas[:height, :width])
