"""Device-side augmentation and normalisation."""

import jax
import jax.numpy as jnp
import numpy as np

from protoseg_jax import augment


def dihedral_variants(image: np.ndarray) -> list[np.ndarray]:
  variants = []
  for flipped in (image, image[:, ::-1]):
    for k in range(4):
      variants.append(np.rot90(flipped, k, axes=(0, 1)))
  return variants


def test_flip_rotate_outputs_are_dihedral_transforms_with_uniform_frequencies():
  rng = np.random.default_rng(0)
  batch = 512
  images = rng.integers(0, 256, (batch, 6, 6, 3), np.uint8)
  out = np.asarray(augment.flip_rotate(jax.random.key(0), jnp.asarray(images)))
  counts = np.zeros(8)
  for image, result in zip(images, out):
    matches = [i for i, v in enumerate(dihedral_variants(image)) if np.array_equal(v, result)]
    assert matches, 'output is not a flip/rotation of its input'
    counts[matches[0]] += 1
  # hflip x vflip x rot90 covers the 8 dihedral transforms uniformly (each 1/8).
  assert np.all(np.abs(counts / batch - 1 / 8) < 0.05), counts


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
