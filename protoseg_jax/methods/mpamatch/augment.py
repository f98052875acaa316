"""UniMatch's weak and strong views as batched, jit-friendly JAX ops (run inside the train step).

Why on the device and not as Grain transforms: the two strong views, the CutMix boxes and the mixed
pseudo-labels must be built from the weak view *and* from predictions made inside the step (the partner's
pseudo-label), so CutMix has to live in the step anyway; doing the colour ops there too keeps one compiled
program, ships uint8 windows (4x less host->device traffic than f32), and leaves the host CPU free. Every op
is branch-free per sample (`jnp.where` / `lax.switch` under `vmap`) with static shapes.

Images here are f32 in [0, 1], `[B, H, W, 3]`; masks are integer `[B, H, W]` with 255 = ignore/padding.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from protoseg_jax import augment as base_augment

GREY_WEIGHTS = (0.299, 0.587, 0.114)   # ITU-R 601 luma, as PIL's 'L' and torchvision's rgb_to_grayscale
PAD_LABEL = 255


# --- weak (geometric) view -------------------------------------------------------------------------

def _axis_maps(scaled: jax.Array, offset: jax.Array, in_size: int, out_size: int):
  """For one axis: bilinear weights `[out, in]`, nearest indices `[out]`, valid `[out]`.

  Output index i reads row r = i + offset of the source resized to `scaled` pixels (PIL-style half-pixel
  centres, no anti-aliasing); r >= scaled is padding.
  """
  r = jnp.arange(out_size, dtype=jnp.float32) + offset.astype(jnp.float32)
  scale = in_size / scaled.astype(jnp.float32)
  valid = r < scaled
  source = jnp.maximum((r + 0.5) * scale - 0.5, 0.0)
  lower = jnp.minimum(jnp.floor(source).astype(jnp.int32), in_size - 1)
  upper = jnp.minimum(lower + 1, in_size - 1)
  frac = source - lower
  weights = (jax.nn.one_hot(lower, in_size) * (1.0 - frac)[:, None]
             + jax.nn.one_hot(upper, in_size) * frac[:, None]) * valid[:, None]
  nearest = jnp.minimum(jnp.floor((r + 0.5) * scale).astype(jnp.int32), in_size - 1)
  return weights, nearest, valid


def rescale_crop(rng: jax.Array, images: jax.Array, masks: jax.Array, out_size: int,
                 scale_range: Sequence[float]) -> tuple[jax.Array, jax.Array]:
  """UniMatch's `resize(ratio U(lo, hi))` + pad (image 0, mask 255) + random crop, per sample.

  images `[B, H, W, 3]` f32, masks `[B, H, W]` int -> `[B, S, S, 3]`, `[B, S, S]` (S = out_size).
  Image bilinear, mask nearest. With `scale_range=(1, 1)` and H = W = S it is the identity.
  """
  batch, height, width = masks.shape
  scale_key, y_key, x_key = jax.random.split(rng, 3)
  ratio = jax.random.uniform(scale_key, (batch,), minval=scale_range[0], maxval=scale_range[1])
  scaled_h = jnp.maximum(jnp.floor(height * ratio), 1.0)
  scaled_w = jnp.maximum(jnp.floor(width * ratio), 1.0)
  # `random.randint(0, w' - S)` inclusive, w' = max(scaled, S) after padding.
  y0 = jnp.floor(jax.random.uniform(y_key, (batch,)) * (jnp.maximum(scaled_h - out_size, 0.0) + 1.0))
  x0 = jnp.floor(jax.random.uniform(x_key, (batch,)) * (jnp.maximum(scaled_w - out_size, 0.0) + 1.0))

  def one(image, mask, sh, sw, oy, ox):
    row_w, row_i, row_ok = _axis_maps(sh, oy, height, out_size)
    col_w, col_i, col_ok = _axis_maps(sw, ox, width, out_size)
    out = jnp.einsum('oh,hwc,pw->opc', row_w, image, col_w, precision=jax.lax.Precision.HIGHEST)
    label = mask[row_i][:, col_i]
    label = jnp.where(row_ok[:, None] & col_ok[None, :], label, PAD_LABEL)
    return out, label

  return jax.vmap(one)(images.astype(jnp.float32), masks.astype(jnp.int32), scaled_h, scaled_w, y0, x0)


def weak_view(rng: jax.Array, images: jax.Array, masks: jax.Array, out_size: int,
              weak: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """uint8 windows `[B, H, W, 3]` + masks `[B, H, W]` -> f32 [0, 1] `[B, S, S, 3]`, int32 `[B, S, S]`.

  Rescale-crop, then the same flips / rot90 for image and mask.
  """
  crop_key, flip_key = jax.random.split(rng)
  images, masks = rescale_crop(crop_key, images.astype(jnp.float32) / 255.0, masks, out_size,
                               weak.scale_range)
  stacked = jnp.concatenate([images, masks[..., None].astype(jnp.float32)], axis=-1)
  stacked = base_augment.flip_rotate(flip_key, stacked, weak.hflip, weak.vflip, weak.rot90,
                                     rot90_prob=weak.get('rot90_prob', 1.0))
  return stacked[..., :3], jnp.round(stacked[..., 3]).astype(jnp.int32)


# --- strong (photometric) ops ----------------------------------------------------------------------

def greyscale(images: jax.Array) -> jax.Array:
  """`[..., 3]` -> luma replicated to 3 channels."""
  grey = jnp.einsum('...c,c->...', images, jnp.asarray(GREY_WEIGHTS, images.dtype))
  return jnp.repeat(grey[..., None], 3, axis=-1)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blend with the image's mean luma (torchvision `adjust_contrast`)."""
  return _blend(image, jnp.mean(greyscale(image)[..., 0]), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(image, greyscale(image), factor)


def rgb_to_hsv(image: jax.Array) -> jax.Array:
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc = jnp.max(image, axis=-1)
  minc = jnp.min(image, axis=-1)
  delta = maxc - minc
  safe = jnp.where(delta > 0, delta, 1.0)
  saturation = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
  hue = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  hue = jnp.where(delta > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
  return jnp.stack([hue, saturation, maxc], axis=-1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
  h, s, v = image[..., 0], image[..., 1], image[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
  i = jnp.mod(i.astype(jnp.int32), 6)
  choices = [jnp.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
  out = choices[0]
  for index in range(1, 6):
    out = jnp.where((i == index)[..., None], choices[index], out)
  return out


def adjust_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotates the hue by `shift` (fraction of a turn, in [-0.5, 0.5])."""
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  return hsv_to_rgb(hsv)


def colour_jitter(rng: jax.Array, images: jax.Array, strengths: Sequence[float], prob: float) -> jax.Array:
  """torchvision `RandomApply([ColorJitter(b, c, s, h)], p)`: per sample, factors b, c, s ~ U(1 -/+ x),
  hue ~ U(-h, h), applied in a random order. A zero strength drops that op (as torchvision does)."""
  brightness, contrast, saturation, hue = strengths
  ops, ranges = [], []
  for op, strength, centre in ((adjust_brightness, brightness, 1.0), (adjust_contrast, contrast, 1.0),
                               (adjust_saturation, saturation, 1.0), (adjust_hue, hue, 0.0)):
    if strength > 0:
      ops.append(op)
      ranges.append((max(centre - strength, 0.0) if centre else -strength, centre + strength))
  if not ops or prob <= 0:
    return images
  batch = images.shape[0]
  apply_key, factor_key, order_key = jax.random.split(rng, 3)
  low = jnp.asarray([r[0] for r in ranges], jnp.float32)
  high = jnp.asarray([r[1] for r in ranges], jnp.float32)
  factors = jax.random.uniform(factor_key, (batch, len(ops)), minval=low, maxval=high)
  orders = jax.vmap(lambda key: jax.random.permutation(key, len(ops)))(jax.random.split(order_key, batch))
  branches = [lambda image, f, op=op, k=k: op(image, f[k]) for k, op in enumerate(ops)]

  def one(image, f, order):
    for position in range(len(ops)):
      image = jax.lax.switch(order[position], branches, image, f)
    return image

  jittered = jax.vmap(one)(images, factors, orders)
  apply = jax.random.bernoulli(apply_key, prob, (batch,))
  return jnp.where(apply[:, None, None, None], jittered, images)


def random_greyscale(rng: jax.Array, images: jax.Array, prob: float) -> jax.Array:
  if prob <= 0:
    return images
  apply = jax.random.bernoulli(rng, prob, (images.shape[0],))
  return jnp.where(apply[:, None, None, None], greyscale(images), images)


def gaussian_blur(images: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur with per-sample `sigma` `[B]`, kernel half-width `radius`, edge padding."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (offsets[None] / jnp.maximum(sigma, 1e-6)[:, None]) ** 2)
  kernel = kernel / jnp.sum(kernel, axis=1, keepdims=True)          # [B, K]
  padded = jnp.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode='edge')
  height, width = images.shape[1:3]
  rows = sum(kernel[:, k, None, None, None] * padded[:, k:k + height] for k in range(2 * radius + 1))
  return sum(kernel[:, k, None, None, None] * rows[:, :, k:k + width] for k in range(2 * radius + 1))


def random_blur(rng: jax.Array, images: jax.Array, prob: float, sigma_range: Sequence[float],
                radius: int) -> jax.Array:
  """UniMatch's `blur(img, p)`: with probability p, Gaussian blur with sigma ~ U(sigma_range)."""
  if prob <= 0:
    return images
  apply_key, sigma_key = jax.random.split(rng)
  batch = images.shape[0]
  sigma = jax.random.uniform(sigma_key, (batch,), minval=sigma_range[0], maxval=sigma_range[1])
  apply = jax.random.bernoulli(apply_key, prob, (batch,))
  return jnp.where(apply[:, None, None, None], gaussian_blur(images, sigma, radius), images)


def strong_view(rng: jax.Array, images: jax.Array, strong: ml_collections.ConfigDict) -> jax.Array:
  """Colour jitter -> random greyscale -> random blur (UniMatch's order), `[B, H, W, 3]` in [0, 1]."""
  jitter_key, grey_key, blur_key = jax.random.split(rng, 3)
  images = colour_jitter(jitter_key, images, strong.jitter, strong.jitter_prob)
  images = random_greyscale(grey_key, images, strong.greyscale_prob)
  return random_blur(blur_key, images, strong.blur_prob, strong.blur_sigma, strong.blur_radius)


# --- CutMix --------------------------------------------------------------------------------------

def cutmix_boxes(rng: jax.Array, batch: int, size: int, prob: float, area_range: Sequence[float],
                 ratio_range: Sequence[float]) -> jax.Array:
  """UniMatch's `obtain_cutmix_box`, per sample: `[B, size, size]` bool.

  With probability `prob`: area ~ U(area_range) * size^2; repeat {ratio ~ U(ratio_range),
  w = int(sqrt(area / ratio)), h = int(sqrt(area * ratio)), x, y ~ U{0..size-1}} until the box fits;
  box = rows y..y+h-1, columns x..x+w-1. Otherwise all False.
  """
  index = jnp.arange(size)

  def one(key):
    apply_key, area_key, loop_key = jax.random.split(key, 3)
    area = jax.random.uniform(area_key, minval=area_range[0], maxval=area_range[1]) * size * size

    def body(carry):
      _, key, _, _, _, _ = carry
      key, ratio_key, x_key, y_key = jax.random.split(key, 4)
      ratio = jax.random.uniform(ratio_key, minval=ratio_range[0], maxval=ratio_range[1])
      width = jnp.floor(jnp.sqrt(area / ratio)).astype(jnp.int32)
      height = jnp.floor(jnp.sqrt(area * ratio)).astype(jnp.int32)
      x = jax.random.randint(x_key, (), 0, size)
      y = jax.random.randint(y_key, (), 0, size)
      return (x + width <= size) & (y + height <= size), key, y, x, height, width

    zero = jnp.zeros((), jnp.int32)
    _, _, y, x, height, width = jax.lax.while_loop(lambda carry: ~carry[0], body,
                                                   (jnp.array(False), loop_key, zero, zero, zero, zero))
    rows = (index >= y) & (index < y + height)
    cols = (index >= x) & (index < x + width)
    return rows[:, None] & cols[None, :] & jax.random.bernoulli(apply_key, prob)

  if prob <= 0:
    return jnp.zeros((batch, size, size), bool)
  return jax.vmap(one)(jax.random.split(rng, batch))


def cutmix(boxes: jax.Array, target: jax.Array, source: jax.Array) -> jax.Array:
  """Pastes `source` into `target` where `boxes` `[B, H, W]` is True; any trailing dims broadcast."""
  mask = boxes.reshape(boxes.shape + (1,) * (target.ndim - boxes.ndim))
  return jnp.where(mask, source, target)


def partner(x: jax.Array) -> jax.Array:
  """The CutMix partner of each sample: the batch reversed (UniMatch V2's `flip(0)`)."""
  return jnp.flip(x, axis=0)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """[0, 1] f32 -> `(x - mean) / std`."""
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
