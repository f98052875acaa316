"""Device-side augmentation, normalisation and the channel order of the model input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax import augment


def dihedral_variants(image: np.ndarray) -> list[np.ndarray]:
  variants = []
  for flipped in (image, image[:, ::-1]):
    for k in range(4):
      variants.append(np.rot90(flipped, k, axes=(0, 1)))
  return variants


def dihedral_counts(batch, **kwargs):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, 6, 6, 3), np.uint8)
  out = np.asarray(augment.flip_rotate(jax.random.key(0), jnp.asarray(images), **kwargs))
  counts = np.zeros(8)
  for image, result in zip(images, out):
    matches = [i for i, v in enumerate(dihedral_variants(image)) if np.array_equal(v, result)]
    assert matches, 'output is not a flip/rotation of its input'
    counts[matches[0]] += 1
  return counts


def test_flip_rotate_outputs_are_dihedral_transforms_with_uniform_frequencies():
  # The old option rot90_prob=1.0 (k uniform): hflip x vflip x rot90 covers the 8 dihedral transforms
  # uniformly (each 1/8).
  batch = 512
  counts = dihedral_counts(batch, rot90_prob=1.0)
  assert np.all(np.abs(counts / batch - 1 / 8) < 0.05), counts


def test_flip_rotate_default_frequencies_are_albumentations_p_half():
  # Default rot90_prob=0.5: P(k) = (10, 2, 2, 2) / 16. The flips give id, h, v = rot180 h, rot180 each 1/4,
  # so rot^j (variants 0..3) and rot^j h (variants 4..7) each have probability (p_j + p_{j+2}) / 4:
  # (3, 1, 3, 1) / 16 for j = 0..3.
  batch = 2048
  expected = np.array([3, 1, 3, 1, 3, 1, 3, 1]) / 16
  counts = dihedral_counts(batch)
  assert np.all(np.abs(counts / batch - expected) < 4 * np.sqrt(expected * (1 - expected) / batch)), counts


def test_flip_rotate_disabled_is_identity():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 5, 5, 3), np.uint8))
  out = augment.flip_rotate(jax.random.key(3), images, hflip=False, vflip=False, rot90=False)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(images))


def test_normalize_matches_formula():
  images = np.random.default_rng(2).integers(0, 256, (2, 3, 3, 3), np.uint8)
  mean, std = (0.6, 0.5, 0.7), (0.2, 0.25, 0.3)
  expected = (images.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(np.asarray(augment.normalize(jnp.asarray(images), mean, std)), expected,
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('channel_order', ['bgr', 'rgb'])
def test_to_model_input_matches_a_float64_reference(channel_order):
  # 'bgr' (the reference): OpenCV's imread gives B, G, R; albumentations' Normalize(MEAN, STD) then applies
  # MEAN[0] / STD[0] to B. The mean / std are the reference's dataset statistics, in that order.
  mean, std = (0.66791496, 0.47791372, 0.70623304), (0.1736589, 0.22564577, 0.19820057)
  tiles = np.random.default_rng(4).integers(0, 256, (2, 5, 7, 3), np.uint8)
  tiles[0, 0, :3] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]   # pure R, G, B pixels
  ordered = tiles[..., ::-1] if channel_order == 'bgr' else tiles
  expected = (ordered.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)
  out = augment.to_model_input(jnp.asarray(tiles), mean, std, channel_order)
  assert out.dtype == jnp.float32 and out.shape == tiles.shape
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)
  # A pure red RGB pixel is (B, G, R) = (0, 0, 255) for the model in 'bgr'.
  red = (np.array([0.0, 0.0, 1.0]) - mean) / std if channel_order == 'bgr' else (
      np.array([1.0, 0.0, 0.0]) - mean) / std
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], red, rtol=1e-6, atol=1e-6)


def test_to_model_input_refuses_an_unknown_order():
  with pytest.raises(ValueError, match='config.data.channel_order'):
    augment.to_model_input(jnp.zeros((1, 2, 2, 3), jnp.uint8), (0.5,) * 3, (0.2,) * 3, 'bgra')
