"""Vision Transformer trunk with block taps (timm `VisionTransformer` layout).

Parameter names follow timm's (`patch_embed`, `cls_token`, `pos_embed`, `blocks_{i}/{norm1,attn,norm2,mlp}`)
so that checkpoints map one-to-one. The trunk returns the token maps after selected blocks (before the final
norm), with the class token dropped: `[B, H/p, W/p, D]` each.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from protoseg_jax import errors, sharding
from protoseg_jax.models import layers, pos_embed as pos_embed_lib
from protoseg_jax.models.attention import SelfAttention

Dtype = Any

# Logical names of the token stream `[B, N, D]` (activation sharding; a no-op without a mesh context).
TOKENS = ('batch', 'length', 'act_embed')


@dataclasses.dataclass(frozen=True)
class VitConfig:
  """Sizes of a ViT trunk. Defaults are CONCH's ViT-B/16 (position table built for 448 x 448)."""

  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  pos_embed_grid: int = 28
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  class_token: bool = True
  layer_scale_init: Optional[float] = None  # UNI (DINOv2) uses LayerScale 1e-5; CONCH none.
  activation: str = 'gelu'
  taps: Sequence[int] = (2, 5, 8, 11)
  # CLIP-style trunk (timm `pre_norm=True`): patch embedding without bias and a LayerNorm `norm_pre`
  # after the position embeddings. CONCH / UNI: False.
  pre_norm: bool = False
  # How the position table is resized to the input's token grid (forward and checkpoint import):
  # 'bicubic_antialias' = timm's `resample_abs_pos_embed` (CONCH / UNI run with `dynamic_img_size=True`);
  # 'bilinear' = F.interpolate(mode='bilinear', align_corners=False), no anti-aliasing (older versions).
  pos_embed_resample: str = pos_embed_lib.BICUBIC_ANTIALIAS

  def __post_init__(self):
    if self.pos_embed_resample not in pos_embed_lib.METHODS:
      raise errors.ConfigError(f'config.model.vit.pos_embed_resample is {self.pos_embed_resample!r}; '
                               f'expected one of {pos_embed_lib.METHODS}')


class Mlp(nn.Module):
  hidden: int
  width: int
  activation: str
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=jnp.float32, name='fc1')(x)
    x = layers.activation(self.activation)(x)
    x = sharding.with_logical_constraint(x, ('batch', 'length', 'act_mlp'))
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name='fc2')(x)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param('gamma', nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: `x + attn(norm1(x))`, `x + mlp(norm2(x))`; residual stream in f32."""

  config: VitConfig
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    y = layers.layer_norm(cfg.layer_norm_eps, 'norm1')(x)
    y = SelfAttention(cfg.width, cfg.num_heads, cfg.qkv_bias, self.dtype, name='attn')(y)
    if cfg.layer_scale_init is not None:
      y = LayerScale(cfg.layer_scale_init, name='ls1')(y)
    x = x + y.astype(jnp.float32)
    y = layers.layer_norm(cfg.layer_norm_eps, 'norm2')(x)
    y = Mlp(int(cfg.width * cfg.mlp_ratio), cfg.width, cfg.activation, self.dtype, name='mlp')(y)
    if cfg.layer_scale_init is not None:
      y = LayerScale(cfg.layer_scale_init, name='ls2')(y)
    return sharding.with_logical_constraint(x + y.astype(jnp.float32), TOKENS)


def resize_pos_embed(pos_embed: jax.Array, num_prefix: int, grid_hw: tuple[int, int],
                     method: str = pos_embed_lib.BICUBIC_ANTIALIAS) -> jax.Array:
  """Resizes the grid part of `[1, prefix + G*G, D]` to `[1, prefix + h*w, D]`, prefix kept apart.

  `method`: 'bicubic_antialias' (timm's `resample_abs_pos_embed`) or 'bilinear' (no anti-aliasing); see
  `protoseg_jax.models.pos_embed.resample_pos_embed`.
  """
  return pos_embed_lib.resample_pos_embed(pos_embed, num_prefix, grid_hw, method)


class VisionTransformer(nn.Module):
  """ViT trunk returning tapped block outputs.

  Call: images `[B, H, W, 3]` (normalised) -> tuple of `[B, H/p, W/p, D]`, one per `config.taps` entry, in
  f32. Blocks after the last tap are not built (nothing would read them).
  """

  config: VitConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
    cfg = self.config
    batch, height, width, _ = images.shape
    if height % cfg.patch_size or width % cfg.patch_size:
      raise ValueError(f'image size {height}x{width} is not a multiple of the patch size {cfg.patch_size}')
    grid_hw = (height // cfg.patch_size, width // cfg.patch_size)
    x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size, padding='VALID',
                use_bias=not cfg.pre_norm, dtype=self.dtype, param_dtype=jnp.float32,
                name='patch_embed')(images.astype(self.dtype))
    x = x.reshape(batch, grid_hw[0] * grid_hw[1], cfg.width).astype(jnp.float32)
    num_prefix = 1 if cfg.class_token else 0
    pos_embed = self.param('pos_embed', nn.initializers.normal(0.02),
                           (1, num_prefix + cfg.pos_embed_grid ** 2, cfg.width))
    if cfg.class_token:
      cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, cfg.width))
      x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, cfg.width)), x], axis=1)
    x = x + resize_pos_embed(pos_embed, num_prefix, grid_hw, cfg.pos_embed_resample)
    x = sharding.with_logical_constraint(x, TOKENS)
    if cfg.pre_norm:
      x = layers.layer_norm(cfg.layer_norm_eps, 'norm_pre')(x)
    taps = sorted(set(cfg.taps))
    if taps and (taps[0] < 0 or taps[-1] >= cfg.depth):
      raise ValueError(f'taps {tuple(cfg.taps)} out of range for a trunk of depth {cfg.depth}')
    outputs = {}
    for index in range(taps[-1] + 1):
      x = Block(cfg, self.dtype, name=f'blocks_{index}')(x)
      if index in taps:
        outputs[index] = x[:, num_prefix:].reshape(batch, *grid_hw, cfg.width)
    return tuple(outputs[index] for index in cfg.taps)
