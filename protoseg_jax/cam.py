"""From class activation maps to masks, as the reference evaluation does it.

Per TTA pass (identity and horizontal flip x intensity factors, the flip undone on the maps):
ReLU -> min-max normalise each class map over space (eps 1e-6) -> multiply by the image-level label ->
bilinear resize to the input size (align_corners=True). The passes are averaged; then
background = (1 - max_c map_c)^power, softmax over [maps, background], argmax -> values 0..C (C = BACK).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from protoseg_jax import ops

MINMAX_EPS = 1e-6


def postprocess_pass(class_maps: jax.Array, labels: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """`[B, h, w, C]` maps, `[B, C]` 0/1 labels -> `[B, H, W, C]` f32 gated maps in [0, 1]."""
  maps = jax.nn.relu(class_maps.astype(jnp.float32))
  low = jnp.min(maps, axis=(1, 2), keepdims=True)
  high = jnp.max(maps, axis=(1, 2), keepdims=True)
  maps = (maps - low) / (high - low + MINMAX_EPS)
  maps = maps * labels[:, None, None, :].astype(jnp.float32)
  return ops.resize_bilinear(maps, tuple(out_hw), align_corners=True)


def tta_class_maps(class_map_fn: Callable[[jax.Array], jax.Array], images: jax.Array, labels: jax.Array,
                   out_hw: tuple[int, int], intensity_factors: Sequence[float] = (0.9, 1.0, 1.1),
                   hflip: bool = True) -> jax.Array:
  """Average of the post-processed maps over the TTA passes -> `[B, H, W, C]`.

  `class_map_fn(images [N, H, W, 3] normalised) -> [N, h, w, C]` is called ONCE on all passes stacked
  along the batch axis (N = passes x B): one large batch keeps the accelerator busy; memory grows with
  the number of passes, so lower `config.eval.batch_size` when it does not fit. The intensity factor
  multiplies the normalised input tensor.
  """
  batch = images.shape[0]
  variants = []
  for factor in intensity_factors:
    variants.append(images * factor)
    if hflip:
      variants.append(images[:, :, ::-1] * factor)
  maps = class_map_fn(jnp.concatenate(variants, axis=0))
  maps = maps.reshape(len(variants), batch, *maps.shape[1:])
  if hflip:  # un-flip the maps of the flipped passes (odd positions)
    flipped = jnp.arange(len(variants)) % 2 == 1
    maps = jnp.where(flipped[:, None, None, None, None], maps[:, :, :, ::-1], maps)
  processed = jax.vmap(lambda m: postprocess_pass(m, labels, out_hw))(maps)
  return jnp.mean(processed, axis=0)


def maps_to_mask(maps: jax.Array, background_power: float = 10.0) -> jax.Array:
  """`[B, H, W, C]` averaged maps -> `[B, H, W]` int32 mask in 0..C (C = background)."""
  background = (1.0 - jnp.max(maps, axis=-1, keepdims=True)) ** background_power
  scores = jax.nn.softmax(jnp.concatenate([maps, background], axis=-1), axis=-1)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)
