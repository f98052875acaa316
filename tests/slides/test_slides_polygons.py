"""Mask -> polygons: hand-computed areas, holes and islands, strip-wise tracing equal to one pass."""

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure

from protoseg_jax.slides import outputs


def ring_and_island():
  """A 40 x 50 square of 1 with a 10 x 20 hole holding a 4 x 4 island, and a lone 3 x 3 speck."""
  mask = np.zeros((80, 90), np.uint8)
  mask[10:50, 20:70] = 1
  mask[20:30, 30:50] = 0
  mask[23:27, 36:40] = 1
  mask[65:68, 5:8] = 1
  return mask


def test_holes_islands_and_areas_are_exact():
  polygons = outputs.class_polygons(ring_and_island(), 1, min_area_px=0, simplify_px=0)
  by_area = sorted(polygons, key=lambda p: p.area)
  # Marching squares cuts every convex corner by 1/8 px and adds 1/8 at every concave one.
  assert [p.area for p in by_area] == [9 - 0.5, 16 - 0.5, 40 * 50 - 200 - 0.5 + 0.5]
  ring = by_area[-1]
  assert len(ring.interiors) == 1 and ring.bounds == (19.5, 9.5, 69.5, 49.5)   # pixel edges
  assert sum(p.area for p in polygons) == pytest.approx((ring_and_island() == 1).sum() - 1.0)


def test_small_polygons_and_holes_are_dropped():
  polygons = outputs.class_polygons(ring_and_island(), 1, min_area_px=20, simplify_px=0)
  assert len(polygons) == 1                                       # the speck and the island are gone
  assert len(polygons[0].interiors) == 1                          # the 200 px hole is kept
  filled = outputs.class_polygons(ring_and_island(), 1, min_area_px=250, simplify_px=0)
  assert len(filled) == 1 and len(filled[0].interiors) == 0       # ... unless smaller than the limit


def test_simplification_keeps_areas():
  yy, xx = np.mgrid[:300, :300]
  disc = ((yy - 150) ** 2 + (xx - 140) ** 2 < 120 ** 2).astype(np.uint8)
  exact = outputs.class_polygons(disc, 1, 0, 0)[0]
  simple = outputs.class_polygons(disc, 1, 0, 0.25)[0]
  assert len(simple.exterior.coords) < 0.5 * len(exact.exterior.coords)
  assert simple.area == pytest.approx(disc.sum(), rel=1e-4)


@pytest.mark.parametrize('strip_rows', [8, 13, 64])
def test_strips_give_the_rings_of_one_pass(strip_rows):
  rng = np.random.default_rng(3)
  mask = (ndimage.gaussian_filter(rng.normal(size=(200, 170)), 5) > 0).astype(np.uint8) * 2
  mask[rng.random(mask.shape) < 0.02] = 1
  rings = outputs.class_rings(mask, 2, strip_px=strip_rows * 170)
  reference = measure.find_contours(np.pad((mask == 2).astype(np.uint8), 1), 0.5)

  def signed_areas(rings_xy):   # shoelace, written out here (the referee of outputs.signed_area)
    return sorted(round(0.5 * float(np.sum(r[:, 0] * np.roll(r[:, 1], -1) - np.roll(r[:, 0], -1) * r[:, 1])),
                        6) for r in rings_xy)

  assert all(np.array_equal(r[0], r[-1]) for r in rings)
  assert signed_areas(rings) == signed_areas([np.stack([r[:, 1] - 1, r[:, 0] - 1], 1) for r in reference])
