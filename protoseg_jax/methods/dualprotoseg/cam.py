"""From class activation maps to masks, as the reference evaluation does it.

Pipeline (spec, "From CAMs to masks, and evaluation"):

1. Test-time augmentation: identity and horizontal flip x intensity factors (0.9, 1.0, 1.1) -> 6 passes.
2. Per pass: ReLU -> min-max normalise each class map over space, `(x - min) / (max - min + 1e-6)`
   -> multiply by the image-level 0/1 label -> bilinear resize to the input size (`align_corners=True`)
   -> undo the flip.
3. Average the passes; background = `(1 - max_c map_c) ** 10`; argmax over `[maps, background]`
   -> mask values `0..C`, where `C` is background.

What the reference code does (read in the PBIP-derived `utils/validate.py` used by DualProtoSeg's
`train.py`; functions `validate` and `get_seg_label`):

* TTA is `ttach.Compose([HorizontalFlip(), Multiply(factors=[0.9, 1.0, 1.1])])` applied with
  `augment_image(inputs)` to the *normalised* input tensor (the same function later de-normalises
  `inputs` with the dataset MEAN/STD for the CRF), so the intensity factor multiplies the normalised
  tensor, not the raw pixels. We do the same: `images` here are already normalised.
* Each pass's merged CAM goes through `get_seg_label` (ReLU, min-max with eps 1e-6, x label, resize with
  `align_corners=True`) and only then `deaugment_mask` un-flips it, i.e. the flip is undone *after*
  post-processing, at the input resolution. Every post-processing step is equivariant to a horizontal
  flip (spatial min/max are flip invariant; bilinear resizing with either corner convention maps a flipped
  input to the flipped output), so un-flipping before or after gives the same maps up to rounding; we
  un-flip after, like the reference.
* Background and argmax: `bg = (1 - max_c cam) ** 10`, `softmax(cat([cam, bg]))`, `argmax`. Softmax is
  strictly monotone, so `maps_to_mask` takes the argmax of the un-normalised scores directly (identical
  except for float ties created by the softmax rounding); `maps_to_probs` gives the softmax (CRF input).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from protoseg_jax import ops

MINMAX_EPS = 1e-6

# images -> merged class maps `[N, h, w, C]`, or (maps, image-level scores `[N, C]`) with a `label_fn`.
ClassMapFn = Callable[[jax.Array], Any]


def postprocess_pass(class_maps: jax.Array, labels: jax.Array, out_hw: tuple[int, int], *,
                     eps: float = MINMAX_EPS, align_corners: bool = True) -> jax.Array:
  """One TTA pass: ReLU, per-map min-max, label gating, bilinear resize.

  Args:
    class_maps: `[B, h, w, C]` merged class maps (any float dtype; computed in f32).
    labels: `[B, C]` image-level labels (0/1); an absent class's map becomes all zeros.
    out_hw: static `(H, W)` output size (the input image size).
    eps: added to `max - min` in the min-max denominator.
    align_corners: resize convention (the reference uses `True`).

  Returns:
    `[B, H, W, C]` float32 maps in `[0, 1)`.
  """
  maps = jax.nn.relu(class_maps.astype(jnp.float32))
  low = jnp.min(maps, axis=(1, 2), keepdims=True)
  high = jnp.max(maps, axis=(1, 2), keepdims=True)
  maps = (maps - low) / (high - low + eps)
  maps = maps * labels.astype(jnp.float32)[:, None, None, :]
  return ops.resize_bilinear(maps, (int(out_hw[0]), int(out_hw[1])), align_corners=align_corners)


def _hflip(x: jax.Array) -> jax.Array:
  """Horizontal flip of `[..., H, W, C]` (the W axis)."""
  return jnp.flip(x, axis=-2)


def tta_class_maps(class_map_fn: ClassMapFn, images: jax.Array, labels: Optional[jax.Array],
                   out_hw: tuple[int, int], intensity_factors: Sequence[float] = (0.9, 1.0, 1.1),
                   hflip: bool = True, *, passes_in_one_call: bool = True, eps: float = MINMAX_EPS,
                   align_corners: bool = True,
                   label_fn: Optional[Callable[[jax.Array], jax.Array]] = None) -> jax.Array:
  """Average of the post-processed class maps over the TTA passes.

  The passes are, as in `ttach.Compose([HorizontalFlip(), Multiply(factors)])`, every (flip, factor)
  pair: `len(intensity_factors) * (2 if hflip else 1)` passes (6 by default). Each pass feeds
  `images * factor` (flipped or not) to `class_map_fn`, post-processes its maps with `postprocess_pass`
  and un-flips the result; the passes are averaged.

  Args:
    class_map_fn: `images [N, H, W, 3] normalised f32 -> merged class maps [N, h, w, C]`. Must treat the
      batch entries independently (no batch statistics), since passes are stacked on the batch axis.
    images: `[B, H, W, 3]` normalised images (the factor multiplies the normalised tensor, as the reference).
    labels: `[B, C]` image-level 0/1 labels used for gating, or None with `label_fn`.
    out_hw: static `(H, W)` output size, normally `images.shape[1:3]`.
    intensity_factors: static multiplicative factors, one pass each (and one more each when `hflip`).
    hflip: whether to add the horizontally flipped passes.
    passes_in_one_call: `True` concatenates all passes along the batch axis and calls `class_map_fn`
      ONCE on `[passes * B, H, W, 3]`: one large batch keeps the accelerator busy, but activation and CAM
      memory grow by the number of passes (6x by default), so lower the evaluation batch size if it does
      not fit. `False` runs the passes sequentially with `jax.lax.scan` (one `class_map_fn` trace, peak
      memory of a single pass, running sum of the maps).
    eps: min-max epsilon (see `postprocess_pass`).
    align_corners: resize convention (see `postprocess_pass`).
    label_fn: when given, `class_map_fn` returns `(maps, image-level scores [N, C])` and the gating labels
      are `label_fn(scores of every pass [passes, B, C]) -> [B, C]` (e.g. the model's own prediction where
      no label is known). With `passes_in_one_call=False` the scores come from one extra un-augmented pass.

  Returns:
    `[B, H, W, C]` float32 averaged maps.
  """
  factors = tuple(float(f) for f in intensity_factors)
  if not factors:
    raise ValueError('intensity_factors must hold at least one factor')
  flips = (False, True) if hflip else (False,)
  num_passes = len(factors) * len(flips)
  batch = images.shape[0]
  out_hw = (int(out_hw[0]), int(out_hw[1]))
  images = images.astype(jnp.float32)
  post = lambda maps, lab: postprocess_pass(maps, lab, out_hw, eps=eps, align_corners=align_corners)

  if passes_in_one_call:
    # Layout [flip][factor][batch]: all un-flipped passes first, then all flipped ones.
    variants = [(_hflip(images) if flip else images) * factor for flip in flips for factor in factors]
    stacked = jnp.concatenate(variants, axis=0)                                # [passes*B, H, W, 3]
    raw = class_map_fn(stacked)
    if label_fn is not None:
      raw, pass_scores = raw
      labels = label_fn(pass_scores.reshape(num_passes, batch, -1))
    tiled_labels = jnp.tile(labels, (num_passes, 1))                           # [passes*B, C]
    maps = post(raw, tiled_labels)                                             # [passes*B, H, W, C]
    maps = maps.reshape(len(flips), len(factors), batch, *maps.shape[1:])
    sums = jnp.sum(maps, axis=1)                                               # [flips, B, H, W, C]
    total = sums[0] + (_hflip(sums[1]) if hflip else 0.0)  # un-flipping is linear: flip the sum once
    return total / num_passes

  if label_fn is not None:
    plain_fn = class_map_fn
    labels = label_fn(plain_fn(images)[1][None])
    class_map_fn = lambda variant_images: plain_fn(variant_images)[0]
  pass_flips = jnp.asarray([flip for flip in flips for _ in factors])
  pass_factors = jnp.asarray([factor for _ in flips for factor in factors], jnp.float32)

  def one_pass(total: jax.Array, pass_params: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    flip, factor = pass_params
    inputs = jnp.where(flip, _hflip(images), images) * factor
    maps = post(class_map_fn(inputs), labels)
    return total + jnp.where(flip, _hflip(maps), maps), None

  channels = jax.eval_shape(class_map_fn, images).shape[-1]
  init = jnp.zeros((batch, *out_hw, channels), jnp.float32)
  total, _ = jax.lax.scan(one_pass, init, (pass_flips, pass_factors))
  return total / num_passes


def maps_to_probs(maps: jax.Array, background_power: float = 10.0) -> jax.Array:
  """`[B, H, W, C]` averaged maps -> `[B, H, W, C + 1]` softmax over `[maps, (1 - max_c maps) ** power]`."""
  return jax.nn.softmax(with_background(maps, background_power), axis=-1)


def maps_to_mask(maps: jax.Array, background_power: float = 10.0) -> jax.Array:
  """`[B, H, W, C]` averaged maps -> `[B, H, W]` int32 mask in `0..C` (`C` = background).

  Background score is `(1 - max_c maps) ** background_power`; a pixel is background where that beats every
  class map (i.e. where all maps are low). Equal to `argmax(maps_to_probs(...))` (softmax is monotone).
  """
  return jnp.argmax(with_background(maps, background_power), axis=-1).astype(jnp.int32)


def with_background(maps: jax.Array, background_power: float) -> jax.Array:
  """`[B, H, W, C]` -> `[B, H, W, C + 1]` with the background score appended last."""
  maps = maps.astype(jnp.float32)
  background = jnp.power(1.0 - jnp.max(maps, axis=-1, keepdims=True), background_power)
  return jnp.concatenate([maps, background], axis=-1)


def cams_to_mask(class_map_fn: ClassMapFn, images: jax.Array, labels: jax.Array,
                 out_hw: tuple[int, int] | None = None, *,
                 intensity_factors: Sequence[float] = (0.9, 1.0, 1.1), hflip: bool = True,
                 passes_in_one_call: bool = True, background_power: float = 10.0) -> jax.Array:
  """TTA class maps -> mask: `images [B, H, W, 3]` normalised, `labels [B, C]` -> `[B, H, W]` int32 in 0..C.

  `out_hw` defaults to the image size. See `tta_class_maps` and `maps_to_mask`.
  """
  out_hw = tuple(images.shape[1:3]) if out_hw is None else out_hw
  maps = tta_class_maps(class_map_fn, images, labels, out_hw, intensity_factors=intensity_factors,
                        hflip=hflip, passes_in_one_call=passes_in_one_call)
  return maps_to_mask(maps, background_power=background_power)
