"""Sliding windows across images: mean stitching and in-order pasting against loops written out here."""

import numpy as np

from protoseg_jax import inference

WINDOW, STRIDE, BATCH = 4, 3, 3


def images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(5, 7, 3), (4, 4, 3), (2, 3, 3), (9, 4, 3)]]


def window_value(windows: np.ndarray) -> np.ndarray:
  """A per-window value that identifies the window's pixels: the mean of its first channel."""
  return windows[..., 0].reshape(len(windows), -1).mean(axis=1)


def corners(height: int, width: int):
  ys = sorted({*range(0, max(height - WINDOW, 0) + 1, STRIDE), max(height - WINDOW, 0)})
  xs = sorted({*range(0, max(width - WINDOW, 0) + 1, STRIDE), max(width - WINDOW, 0)})
  return [(y, x) for y in ys for x in xs]


def padded(image: np.ndarray) -> np.ndarray:
  canvas = np.zeros((max(image.shape[0], WINDOW), max(image.shape[1], WINDOW), 3), np.uint8)
  canvas[:image.shape[0], :image.shape[1]] = image
  return canvas


def test_stitched_scores_are_the_weighted_mean_of_the_windows():
  weight = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
  calls = []

  def scores_call(windows, labels):
    calls.append(len(windows))
    value = window_value(windows).astype(np.float32)
    return np.stack([np.broadcast_to(value[:, None, None], (len(windows), WINDOW, WINDOW)),
                     np.broadcast_to(labels[:, :1, None].astype(np.float32), (len(windows), WINDOW, WINDOW))],
                    axis=-1)

  labels = np.arange(4, dtype=np.int32)[:, None] * np.ones((1, 2), np.int32)
  results = list(inference.stitched_scores(scores_call, images(), labels, WINDOW, STRIDE, BATCH, weight))
  assert [index for index, _ in results] == [0, 1, 2, 3] and set(calls) == {BATCH}
  for (index, scores), image in zip(results, images()):
    canvas = padded(image)
    total = np.zeros(canvas.shape[:2] + (2,), np.float64)
    weights = np.zeros(canvas.shape[:2] + (1,), np.float64)
    for y, x in corners(*image.shape[:2]):
      value = window_value(canvas[None, y:y + WINDOW, x:x + WINDOW])[0]
      total[y:y + WINDOW, x:x + WINDOW] += np.stack([weight * value, weight * index], -1)
      weights[y:y + WINDOW, x:x + WINDOW, 0] += weight
    expected = (total / weights)[:image.shape[0], :image.shape[1]]
    assert scores.shape == image.shape[:2] + (2,) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_pasted_maps_put_later_windows_on_top():
  def map_call(windows, labels):
    del labels
    value = np.round(window_value(windows)).astype(np.int32)
    return np.broadcast_to(value[:, None, None], (len(windows), WINDOW, WINDOW))

  labels = np.full((4, 1), -1, np.int32)
  results = list(inference.pasted_maps(map_call, images(), labels, WINDOW, STRIDE, BATCH, fill=255))
  assert [index for index, _ in results] == [0, 1, 2, 3]
  for (_, pasted), image in zip(results, images()):
    canvas = padded(image)
    expected = np.full(canvas.shape[:2], -7, np.int64)
    for y, x in corners(*image.shape[:2]):
      expected[y:y + WINDOW, x:x + WINDOW] = np.round(window_value(canvas[None, y:y + WINDOW, x:x + WINDOW])[0])
    assert pasted.dtype == np.int32
    np.testing.assert_array_equal(pasted, expected[:image.shape[0], :image.shape[1]])
