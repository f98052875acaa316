"""Dense CRF of the test pass (pydensecrf, extra `crf`): cleaning, the reference's call sequence, the image
the reference's CRF sees, the process pool, and the one-line error without the extra."""

import sys

import numpy as np
import pytest

from protoseg_jax import crf
from protoseg_jax.errors import ConfigError

densecrf = pytest.importorskip('pydensecrf.densecrf', reason='pydensecrf (extra "crf") is not installed')
from pydensecrf.utils import unary_from_softmax  # noqa: E402

MEAN = (0.66791496, 0.47791372, 0.70623304)   # the reference's dataset statistics
STD = (0.1736589, 0.22564577, 0.19820057)


def two_colour(height, width, num_classes=2, seed=0, split=None):
  """Left of column `split` (default: half) one colour (class 0), right of it another (class 1); the
  correct class has probability 0.6 + N(0, 0.19) (clipped), which flips ~30 % of the argmaxes; the other
  classes share the rest."""
  rng = np.random.default_rng(seed)
  split = width // 2 if split is None else split
  image = np.zeros((height, width, 3), np.uint8)
  image[:, :split] = (200, 60, 90)
  image[:, split:] = (70, 170, 120)
  truth = np.zeros((height, width), np.int64)
  truth[:, split:] = 1
  correct = np.clip(0.6 + rng.normal(0.0, 0.19, (height, width)), 0.01, 0.99)
  probs = np.repeat(((1.0 - correct) / (num_classes - 1))[..., None], num_classes, axis=-1)
  np.put_along_axis(probs, truth[..., None], correct[..., None], axis=-1)
  return image, probs.astype(np.float32), truth


def reference_process(probs, images, n_infer=5):
  """The reference's `DenseCRF.process` call sequence on `[B, K, H, W]` / `[B, H, W, 3]` (its layout)."""
  out = []
  for prob, image in zip(probs, images):
    kept = np.where(np.sum(np.sum(prob, axis=1), axis=1) > 0)[0]
    d = densecrf.DenseCRF2D(image.shape[1], image.shape[0], len(kept))
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(prob[kept])))
    d.addPairwiseGaussian(sxy=15, compat=30)
    d.addPairwiseBilateral(sxy=10, srgb=20, rgbim=np.ascontiguousarray(image, np.uint8), compat=50)
    marginals = np.zeros(prob.shape)
    marginals[kept] = np.array(d.inference(n_infer)).reshape((len(kept),) + image.shape[:2])
    out.append(np.argmax(marginals, axis=0))
  return np.stack(out)


def test_noisy_two_colour_tile_is_cleaned_to_the_colour_boundary():
  image, probs, truth = two_colour(96, 96)
  raw = np.mean(probs.argmax(-1) == truth)
  assert 0.65 < raw < 0.75
  mask = crf.refine(image, probs)
  assert mask.dtype == np.uint8 and mask.shape == (96, 96)
  assert np.mean(mask == truth) >= 0.99


def test_refine_is_the_reference_call_sequence():
  # Non-square tiles (catches a W/H swap), 5 classes, one of them all-zero (left out, as the reference).
  tiles = [two_colour(40, 72, num_classes=5, seed=seed) for seed in (1, 2)]
  images = np.stack([tile[0] for tile in tiles])
  images[1] = np.random.default_rng(3).integers(0, 256, images[1].shape, dtype=np.uint8)  # texture
  probs = np.stack([tile[1] for tile in tiles])
  probs[0, ..., 3] = 0.0
  expected = reference_process(probs.transpose(0, 3, 1, 2), images)
  np.testing.assert_array_equal(crf.refine_batch(images, probs), expected)
  assert not np.any(crf.refine(images[0], probs[0]) == 3)


def test_reference_image_is_albumentations_then_torch_denormalisation():
  albumentations = pytest.importorskip('albumentations')
  torch = pytest.importorskip('torch')
  tile = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None, None], (256, 4, 3)).copy()
  tile[:, 1] = tile[:, 0][::-1]                                  # every value, in every channel
  normalized = albumentations.Normalize(MEAN, STD)(image=tile)['image']
  x = torch.from_numpy(normalized).permute(2, 0, 1)[None]
  seen = torch.clamp((x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255,
                     0, 255).byte()[0].permute(1, 2, 0).numpy()
  ours = crf.reference_image(tile, MEAN, STD)
  np.testing.assert_array_equal(ours, seen)
  assert 0.2 < np.mean(ours != tile) < 0.8          # truncation: many values come back one lower
  assert np.all((tile.astype(int) - ours) >= 0) and np.all((tile.astype(int) - ours) <= 1)


def test_pool_equals_serial_in_submission_order():
  batches = []
  for seed, size in ((4, 2), (5, 1), (6, 3)):
    tiles = [two_colour(48, 48, num_classes=5, seed=seed * 10 + i, split=8 + 5 * seed + 3 * i)
             for i in range(size)]
    batches.append((np.stack([tile[0] for tile in tiles]), np.stack([tile[1] for tile in tiles])))
  serial = [crf.refine_batch(images, probs) for images, probs in batches]
  flat = [mask for batch in serial for mask in batch]
  assert len({mask.tobytes() for mask in flat}) == len(flat)    # every tile's mask is different
  with crf.CrfPool(workers=2, max_pending=2) as pool:
    for images, probs in batches:
      pool.submit(images, probs)
    collected = list(pool.ready()) + list(pool.drain())
  assert len(collected) == 3
  for got, want in zip(collected, serial):
    np.testing.assert_array_equal(got, want)
  with crf.CrfPool(workers=0) as pool:                          # in-process fallback, same results
    for images, probs in batches:
      pool.submit(images, probs)
    for got, want in zip(pool.drain(), serial):
      np.testing.assert_array_equal(got, want)


def test_missing_extra_is_one_line_naming_it(monkeypatch):
  for name in ('pydensecrf', 'pydensecrf.densecrf', 'pydensecrf.utils'):
    monkeypatch.setitem(sys.modules, name, None)                # `import` now raises ImportError
  with pytest.raises(ConfigError) as error:
    crf.CrfPool(workers=0)
  assert str(error.value) == 'dense CRF needs pydensecrf: pip install -e ".[crf]" (config.eval.crf)'
  assert '\n' not in str(error.value)
  image, probs, _ = two_colour(8, 8)
  with pytest.raises(ConfigError, match=r'pip install -e "\.\[crf\]"'):
    crf.refine(image, probs)
