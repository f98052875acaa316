"""Small array ops shared by the models and the CAM post-processing.

Everything here is a pure function of arrays and static Python values, so it traces once under `jax.jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """1-D bilinear interpolation weights `[out_size, in_size]` matching `torch.nn.functional.interpolate`.

  With `align_corners=False` (half-pixel centres) source coordinates are clamped at 0 like PyTorch does,
  and no anti-aliasing is applied when downsampling (PyTorch's default `antialias=False`).
  """
  weights = np.zeros((out_size, in_size), np.float64)
  out_index = np.arange(out_size, dtype=np.float64)
  if align_corners:
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    source = out_index * scale
  else:
    scale = in_size / out_size
    source = np.maximum((out_index + 0.5) * scale - 0.5, 0.0)
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = source - lower
  np.add.at(weights, (np.arange(out_size), lower), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), upper), frac)
  return weights


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int], align_corners: bool = False) -> jax.Array:
  """Bilinear resize of `[..., H, W, C]` to `[..., out_h, out_w, C]`, PyTorch-exact.

  Implemented as two small matrix products (separable interpolation), which is exact, cheap on
  accelerators, and differentiable.
  """
  in_h, in_w = x.shape[-3], x.shape[-2]
  out_h, out_w = out_hw
  if (in_h, in_w) == (out_h, out_w):
    return x
  rows = jnp.asarray(bilinear_matrix(in_h, out_h, align_corners), x.dtype)
  cols = jnp.asarray(bilinear_matrix(in_w, out_w, align_corners), x.dtype)
  x = jnp.einsum('oh,...hwc->...owc', rows, x)
  return jnp.einsum('pw,...owc->...opc', cols, x)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`, as `torch.nn.functional.normalize` (norm computed in f32)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
  return (x / jnp.maximum(norm, eps).astype(x.dtype)).astype(x.dtype)


def merge_prototypes(scores: jax.Array, num_classes: int, how: str) -> jax.Array:
  """Merges per-prototype scores `[..., P]` into per-class scores `[..., C]`.

  Prototypes are grouped class-major: class c owns the consecutive slice `[c*P/C, (c+1)*P/C)`.
  `how='mean'` is the plain mean over the group; `how='max'` is the reference code's soft maximum,
  `sum(softmax(x) * x)` over the group.
  """
  group = scores.reshape(*scores.shape[:-1], num_classes, scores.shape[-1] // num_classes)
  if how == 'mean':
    return jnp.mean(group, axis=-1)
  if how == 'max':
    return jnp.sum(jax.nn.softmax(group, axis=-1) * group, axis=-1)
  raise ValueError(f"unknown prototype merge {how!r}: expected 'mean' or 'max'")


def interleave(first: jax.Array, second: jax.Array) -> jax.Array:
  """`[N, D]`, `[N, D]` -> `[2N, D]` ordered `first[0], second[0], first[1], second[1], ...`."""
  return jnp.stack([first, second], axis=1).reshape(-1, first.shape[-1])
