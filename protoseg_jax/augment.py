"""Device-side preprocessing: the host ships uint8 tiles, the jitted step augments and normalises them.

Keeping augmentation on the accelerator moves it off the host CPU (the usual bottleneck on GPU boxes) and
makes it part of the one compiled train step; uint8 transfers are 4x smaller than f32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> f32 `(x / 255 - mean) / std`."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def flip_rotate(rng: jax.Array, images: jax.Array, hflip: bool = True, vflip: bool = True,
                rot90: bool = True) -> jax.Array:
  """Per-sample random horizontal flip (p 0.5), vertical flip (p 0.5), then rot90 by k ~ U{0..3}.

  `[B, H, W, C]` -> same shape (square tiles are required for rot90). Selection is by `jnp.where`, so
  the op is branch-free and batched.
  """
  batch = images.shape[0]
  flip_key, vflip_key, rot_key = jax.random.split(rng, 3)

  def per_sample(flag: jax.Array) -> jax.Array:
    return flag.reshape(batch, 1, 1, 1)

  if hflip:
    do_flip = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(per_sample(do_flip), images[:, :, ::-1], images)
  if vflip:
    do_flip = jax.random.bernoulli(vflip_key, 0.5, (batch,))
    images = jnp.where(per_sample(do_flip), images[:, ::-1], images)
  if rot90:
    if images.shape[1] != images.shape[2]:
      raise ValueError(f'rot90 augmentation needs square tiles, got {images.shape[1:3]}')
    k = jax.random.randint(rot_key, (batch,), 0, 4)
    rotated = images
    for quarter_turns in range(1, 4):
      rotated = jnp.where(per_sample(k == quarter_turns), jnp.rot90(images, quarter_turns, axes=(1, 2)),
                          rotated)
    images = rotated
  return images
