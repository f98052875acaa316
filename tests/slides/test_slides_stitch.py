"""Blended stitching: exact where tiles agree (no seams), tile-edge artefacts damped, band emission order."""

import numpy as np
import pytest

from protoseg_jax.slides import stitch


def stitch_field(grid, tile_scores, blend, k):
  """Runs every tile of `grid` through a BandStitcher; -> (labels [H, W], blended scores [H, W, K])."""
  height, width = grid.mask_height, grid.mask_width
  labels = np.full((height, width), 255, np.uint8)
  scores = np.full((height, width, k), np.nan, np.float32)
  emitted = []

  def emit(y0, rows):
    emitted.append((y0, rows.shape[0]))
    labels[y0:y0 + rows.shape[0]] = rows

  def scores_out(y0, rows):
    scores[y0:y0 + rows.shape[0]] = rows

  weights = stitch.importance_map(grid.tile // grid.d, blend)
  stitcher = stitch.BandStitcher(grid, k, weights, emit, 7, scores_out)
  for row in range(grid.rows):
    for col in range(grid.cols):
      stitcher.add(row, col, tile_scores(*grid.origin(row, col)))
  stitcher.finish()
  starts = [y0 for y0, _ in emitted]
  assert starts == sorted(starts) and sum(n for _, n in emitted) == height   # each row once, in order
  return labels, scores


def global_field(width, height, k):
  """A smooth score field over the whole image (model pixels): what overlapping tiles agree on."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  channels = [np.sin(xx / 37.0 + c) * np.cos(yy / 23.0 - 0.5 * c) + 0.01 * c for c in range(k)]
  return np.stack(channels, -1).astype(np.float32)


@pytest.mark.parametrize('blend', ['mean', 'gaussian'])
@pytest.mark.parametrize('d', [1, 4])
def test_agreeing_overlaps_stitch_exactly(blend, d):
  grid = stitch.Grid(width=300, height=250, tile=64, stride=48, d=d)
  k = 3
  cover = global_field(grid.cols * 48 + 64, grid.rows * 48 + 64, k)       # past the edges, like glass tiles
  tile_scores = lambda x, y: cover[y:y + 64, x:x + 64]
  labels, scores = stitch_field(grid, tile_scores, blend, k)
  expected = stitch.block_mean(cover[:grid.mask_height * d, :grid.mask_width * d], d)
  np.testing.assert_allclose(scores, expected, atol=2e-5)
  np.testing.assert_array_equal(labels, expected.argmax(-1))


def interior_steps(scores, grid):
  """|step| of channel 0 between neighbouring mask columns, away from the slide's outer tile margin."""
  steps = np.abs(np.diff(scores[..., 0], axis=1))
  m = grid.tile // grid.d
  return steps[m:-m, m:-m]


def test_gaussian_blend_damps_tile_edge_artefacts():
  # Scores that depend on the position inside the tile: a strong band along each tile's left edge (like a
  # padding artefact), identical in every tile.
  tile = 64
  band = np.exp(-np.arange(tile) / 3.0)[None, :].repeat(tile, axis=0)
  artefact = np.stack([band, 1 - band], -1).astype(np.float32)
  no_overlap = stitch.Grid(width=384, height=192, tile=tile, stride=tile, d=1)
  _, hard = stitch_field(no_overlap, lambda x, y: artefact, 'mean', 2)
  overlap = stitch.Grid(width=384, height=192, tile=tile, stride=32, d=1)
  _, mean = stitch_field(overlap, lambda x, y: artefact, 'mean', 2)
  _, gauss = stitch_field(overlap, lambda x, y: artefact, 'gaussian', 2)
  assert interior_steps(hard, no_overlap).max() > 0.9    # a seam: ~0 -> 1 at every tile border
  assert interior_steps(mean, overlap).max() > 0.4       # plain averaging halves it, still a seam
  assert interior_steps(gauss, overlap).max() < 0.01     # the importance map hides the tile edge
  assert gauss[64:-64, 64:-64, 0].max() < 0.01


def test_uncovered_pixels_get_the_empty_value_and_rows_are_bounded():
  grid = stitch.Grid(width=200, height=200, tile=64, stride=48, d=4)
  labels = np.full((grid.mask_height, grid.mask_width), 255, np.uint8)

  def emit(y0, rows):
    labels[y0:y0 + rows.shape[0]] = rows

  stitcher = stitch.BandStitcher(grid, 2, stitch.importance_map(16, 'gaussian'), emit, 9)
  assert stitcher.acc.shape[0] == 64 // 4            # one tile row of the mask in memory, whatever the height
  one = np.zeros((64, 64, 2), np.float32)
  one[..., 1] = 1
  stitcher.add(1, 1, one)                            # the only processed tile: model pixels 48..112
  stitcher.finish()
  expected = np.full_like(labels, 9)
  expected[12:28, 12:28] = 1
  np.testing.assert_array_equal(labels, expected)
  later = stitch.BandStitcher(grid, 2, stitch.importance_map(16, 'mean'), emit, 9)
  later.add(2, 0, one)
  with pytest.raises(ValueError, match='row-major'):
    later.add(1, 0, one)
