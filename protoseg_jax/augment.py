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


def _check_rot90_prob(rot90_prob) -> None:
  if isinstance(rot90_prob, (int, float)) and not 0.0 <= rot90_prob <= 1.0:
    raise ValueError(f'config.data.augment.rot90_prob is {rot90_prob}; expected a probability in [0, 1]')


def flip_rotate(rng: jax.Array, images: jax.Array, hflip: bool = True, vflip: bool = True,
                rot90: bool = True, *, rot90_prob: float = 0.5) -> jax.Array:
  """Per-sample random horizontal flip (p 0.5), vertical flip (p 0.5), then a quarter-turn rotation.

  The rotation is albumentations' `RandomRotate90(p=rot90_prob)`: with probability `rot90_prob` it fires
  and turns by k ~ U{0..3} (k = 0 included), otherwise k = 0. The default 0.5 (albumentations' default p,
  the reference's) gives P(k=0) = 0.625 and P(k=1) = P(k=2) = P(k=3) = 0.125; `rot90_prob=1.0` is
  k ~ U{0..3} (older versions, the same random stream: k is drawn from the same key either way).

  `[B, H, W, C]` -> same shape (square tiles are required for rot90). Selection is by `jnp.where`, so
  the op is branch-free and batched.
  """
  _check_rot90_prob(rot90_prob)
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
    fires = jax.random.bernoulli(jax.random.fold_in(rot_key, 1), rot90_prob, (batch,))
    k = jnp.where(fires, k, 0)
    rotated = images
    for quarter_turns in range(1, 4):
      rotated = jnp.where(per_sample(k == quarter_turns), jnp.rot90(images, quarter_turns, axes=(1, 2)),
                          rotated)
    images = rotated
  return images


CHANNEL_ORDERS = ('rgb', 'bgr')


def to_model_input(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                   channel_order: str = 'rgb') -> jax.Array:
  """uint8 RGB tiles `[..., H, W, 3]` -> the model's f32 input: channels in `channel_order`, then
  `(x / 255 - mean) / std` with `mean` / `std` given in that order.

  The one place where a tile becomes model input (train steps, evaluation, predict, slides, bench), so a
  model is always served in the channel order it was trained in (`config.data.channel_order`).
  """
  if channel_order not in CHANNEL_ORDERS:
    raise ValueError(f'config.data.channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}')
  if channel_order == 'bgr':
    images = images[..., ::-1]
  return normalize(images, mean, std)
