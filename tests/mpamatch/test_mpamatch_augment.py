"""MPAMatch views: weak rescale-crop, strong colour ops, blur, CutMix boxes and target mixing."""

import colorsys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from protoseg_jax.methods.mpamatch import augment, train
from protoseg_jax.methods.mpamatch.config import get_config


def _images(seed=0, shape=(3, 8, 8, 3)):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, shape), jnp.float32)


def test_rescale_crop_is_identity_at_scale_one():
  images = _images()
  masks = jnp.asarray(np.random.default_rng(1).integers(0, 3, (3, 8, 8)), jnp.int32)
  out, labels = augment.rescale_crop(jax.random.key(0), images, masks, 8, (1.0, 1.0))
  np.testing.assert_allclose(out, images, atol=1e-6)
  np.testing.assert_array_equal(labels, masks)


def test_rescale_crop_downscale_pools_and_pads_with_ignore():
  images = _images(shape=(2, 8, 8, 3))
  masks = jnp.asarray(np.arange(2 * 64).reshape(2, 8, 8) % 200, jnp.int32)
  out, labels = augment.rescale_crop(jax.random.key(3), images, masks, 8, (0.5, 0.5))
  # Scaled to 4x4 (half-pixel bilinear = 2x2 mean), then padded to 8x8: image 0, mask 255.
  pooled = np.asarray(images).reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(out[:, :4, :4], pooled, atol=1e-6)
  np.testing.assert_array_equal(out[:, 4:], 0.0)
  np.testing.assert_array_equal(labels[:, :4, :4], np.asarray(masks)[:, 1::2, 1::2])  # PIL nearest
  assert (np.asarray(labels[:, 4:]) == 255).all() and (np.asarray(labels[:, :, 4:]) == 255).all()


def test_rescale_crop_upscale_is_a_crop_of_the_nearest_upsampled_mask():
  masks = jnp.asarray(np.random.default_rng(2).integers(0, 5, (4, 6, 6)), jnp.int32)
  _, labels = augment.rescale_crop(jax.random.key(5), jnp.zeros((4, 6, 6, 3)), masks, 6, (2.0, 2.0))
  for mask, label in zip(np.asarray(masks), np.asarray(labels)):
    big = np.repeat(np.repeat(mask, 2, 0), 2, 1)
    assert any(np.array_equal(big[y:y + 6, x:x + 6], label) for y in range(7) for x in range(7))


def test_weak_view_moves_image_and_mask_together():
  config = get_config()
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 4, (4, 4, 4))
  mask = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2).astype(np.uint8)  # 4x4 blocks of one class
  image = np.repeat(mask[..., None] * 60, 3, axis=-1).astype(np.uint8)  # the image encodes its mask
  out, labels = augment.weak_view(jax.random.key(1), jnp.asarray(image), jnp.asarray(mask), 16,
                                  config.data.weak)
  inside = np.asarray(labels) != 255
  expected = np.asarray(labels) * 60 / 255.0
  # Away from label edges (3x3 output neighbourhood of one class) the bilinear image reproduces the
  # nearest-resampled mask exactly; near edges it would blend.
  flat = ndimage.minimum_filter(np.asarray(labels), size=(1, 3, 3)) == ndimage.maximum_filter(
      np.asarray(labels), size=(1, 3, 3))
  flat[:, [0, -1]] = False  # border pixels: their bilinear taps reach source rows outside the crop
  flat[:, :, [0, -1]] = False
  assert (inside & flat).sum() > 200
  np.testing.assert_allclose(np.asarray(out)[..., 0][inside & flat], expected[inside & flat], atol=1e-5)


ZERO_STRONG = ml_collections.ConfigDict(dict(jitter=(0.0, 0.0, 0.0, 0.0), jitter_prob=0.8, greyscale_prob=0.0,
                                             blur_prob=0.0, blur_sigma=(0.1, 2.0), blur_radius=3))


def test_strong_view_is_identity_at_zero_strength():
  images = _images(4)
  np.testing.assert_array_equal(augment.strong_view(jax.random.key(0), images, ZERO_STRONG), images)
  # Zero-width blur (sigma -> 0) and always-on jitter of zero strength are the identity too.
  blurred = augment.random_blur(jax.random.key(1), images, 1.0, (1e-4, 1e-4), 3)
  np.testing.assert_allclose(blurred, images, atol=1e-6)
  np.testing.assert_array_equal(augment.colour_jitter(jax.random.key(2), images, (0, 0, 0, 0), 1.0), images)
  boxes = augment.cutmix_boxes(jax.random.key(3), 3, 8, 0.0, (0.02, 0.4), (0.3, 1 / 0.3))
  assert not np.asarray(boxes).any()
  np.testing.assert_array_equal(augment.cutmix(boxes, images[:3], augment.partner(images[:3])), images[:3])


def test_hue_shift_matches_colorsys():
  pixels = np.random.default_rng(0).uniform(0, 1, (50, 3))
  shift = 0.13
  ours = np.asarray(augment.adjust_hue(jnp.asarray(pixels, jnp.float32), shift))
  expected = []
  for r, g, b in pixels:
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    expected.append(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v))
  np.testing.assert_allclose(ours, np.asarray(expected), atol=1e-5)


def test_contrast_saturation_brightness_follow_torchvision_definitions():
  image = np.random.default_rng(1).uniform(0, 1, (5, 6, 3))
  grey = image @ np.asarray(augment.GREY_WEIGHTS)
  x = jnp.asarray(image, jnp.float32)
  np.testing.assert_allclose(augment.adjust_brightness(x, 1.3), np.clip(1.3 * image, 0, 1), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_contrast(x, 0.6), np.clip(0.6 * image + 0.4 * grey.mean(), 0, 1),
                             atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(x, 1.4),
                             np.clip(1.4 * image - 0.4 * grey[..., None], 0, 1), atol=1e-6)


def test_colour_jitter_factors_stay_in_range():
  grey_card = jnp.full((64, 4, 4, 3), 0.5, jnp.float32)  # contrast/saturation/hue act as no-ops on grey
  out = np.asarray(augment.colour_jitter(jax.random.key(0), grey_card, (0.5, 0.5, 0.5, 0.25), 1.0))
  brightness = out[:, 0, 0, 0] / 0.5
  assert brightness.min() >= 0.5 - 1e-5 and brightness.max() <= 1.5 + 1e-5
  assert brightness.std() > 0.15  # uniform on [0.5, 1.5]: std 0.29


def test_gaussian_blur_matches_scipy():
  images = _images(2, (2, 12, 10, 3))
  sigma = jnp.asarray([0.7, 1.6])
  ours = np.asarray(augment.gaussian_blur(images, sigma, 4))
  for index, s in enumerate(np.asarray(sigma)):
    ref = ndimage.gaussian_filter(np.asarray(images[index], np.float64), (s, s, 0), mode='nearest',
                                  truncate=4 / s)
    np.testing.assert_allclose(ours[index], ref, atol=1e-5)


def test_cutmix_boxes_are_fitting_rectangles_of_the_configured_area():
  size, count = 32, 200
  boxes = np.asarray(augment.cutmix_boxes(jax.random.key(7), count, size, 1.0, (0.02, 0.4), (0.3, 1 / 0.3)))
  for box in boxes:
    rows, cols = np.nonzero(box.any(axis=1))[0], np.nonzero(box.any(axis=0))[0]
    assert rows.size and cols.size
    assert box.sum() == rows.size * cols.size  # one solid rectangle
    assert np.array_equal(rows, np.arange(rows[0], rows[-1] + 1))
    area = box.sum() / size ** 2
    assert area <= 0.4 + 1e-9
    ratio = rows.size / cols.size
    assert 0.2 < ratio < 4.5  # floor() of sqrt(area*r), sqrt(area/r) with r in [0.3, 3.33]
  applied = np.asarray(augment.cutmix_boxes(jax.random.key(8), 400, 16, 0.5, (0.02, 0.4), (0.3, 1 / 0.3)))
  assert 0.4 < applied.any(axis=(1, 2)).mean() < 0.6


def test_cutmix_pastes_the_reversed_batch_and_mixes_targets():
  images = jnp.asarray(np.arange(3 * 4 * 4 * 1, dtype=np.float32).reshape(3, 4, 4, 1))
  boxes = np.zeros((3, 4, 4), bool)
  boxes[0, :2, :2] = True     # sample 0 receives sample 2's top-left quarter
  boxes[1, 3, :] = True       # sample 1 receives its own bottom row (it is its own partner)
  boxes = jnp.asarray(boxes)
  mixed = np.asarray(augment.cutmix(boxes, images, augment.partner(images)))
  expected = np.asarray(images).copy()
  expected[0, :2, :2] = np.asarray(images)[2, :2, :2]
  np.testing.assert_array_equal(mixed, expected)

  y_w = jnp.asarray(np.stack([np.full((4, 4), c) for c in (0, 1, 2)]), jnp.int32)
  conf_w = jnp.full((3, 4, 4), 0.99)
  ignore = jnp.zeros((3, 4, 4), jnp.int32)
  y_mix = augment.partner(y_w + 10)                  # eval-mode prediction of each partner
  conf_mix = jnp.full((3, 4, 4), 0.5)
  ignore_mix = augment.partner(ignore.at[2, 0, 0].set(255))
  y, conf, ign = train.mixed_targets(boxes, (y_w, conf_w, ignore), (y_mix, conf_mix, ignore_mix))
  y, conf, ign = map(np.asarray, (y, conf, ign))
  assert (y[0, :2, :2] == 12).all() and (y[0, 2:] == 0).all() and (y[0, :2, 2:] == 0).all()
  assert (y[1, 3] == 11).all() and (y[1, :3] == 1).all()
  assert (y[2] == 2).all()
  assert conf[0, 0, 0] == pytest.approx(0.5) and conf[0, 3, 3] == pytest.approx(0.99)
  assert ign[0, 0, 0] == 255 and ign.sum() == 255  # the partner's padding travels with its pixels
