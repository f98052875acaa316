"""DualProtoSeg: frozen CLIP trunk + refiner + pyramid + dual-modal prototype bank + per-level CAM heads.

Module and parameter names follow the authors' PyTorch `ClsNetwork` where one exists (`shared_decoder`,
`feature_pyramid_{i}`, `proto_projections_{i}`, `text_proj`, `learnable_image_prototypes`,
`logit_scale{i}`, `prompt_learner/ctx`), so that export is a renaming and a transpose.

Shapes: B batch, C classes, M prompts per class, P = 2*C*M prototypes, F prototype dim (512),
D trunk width, h = w = input / patch (14 at 224), s_i = h * upsample_i, c_i pyramid channels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from protoseg_jax import ops, sharding
from protoseg_jax.models import layers
from protoseg_jax.models.text import PromptLearner, TextConfig, TextTransformer
from protoseg_jax.models.vit import VisionTransformer, VitConfig

Dtype = Any

FROZEN_COLLECTIONS = ('trunk', 'text_encoder')

# Logical names of feature maps `[B, h, w, c]` and of the stacked trunk taps `[T, B, h, w, D]` (activation
# sharding; a no-op without a mesh context).
FEATURE_MAP = ('batch', None, None, 'act_channels')
STACKED_TAPS = (None, 'batch', None, None, 'act_embed')


@dataclasses.dataclass(frozen=True)
class DualProtoSegConfig:
  """Every size of the model. Defaults are the published CONCH ViT-B/16 setting."""

  num_classes: int = 4
  prompts_per_class: int = 10
  n_ctx: int = 16
  vit: VitConfig = VitConfig()
  text: TextConfig = TextConfig()
  refiner_width: int = 256
  refiner_blocks: int = 8
  refiner_dropout: float = 0.1
  refiner_remat: bool = True        # recompute each refiner block's elementwise work in the backward pass
  feature_dim: int = 512
  group_norm_groups: int = 16
  pyramid_channels: Sequence[int] = (256, 128, 64, 32)
  pyramid_upsample: Sequence[int] = (2, 4, 8, 16)   # s_i = patch grid * factor: 28, 56, 112, 224 at 224
  logit_scale_init: float = 1.0 / 0.07
  image_prototype_init_std: float = 0.02

  @property
  def num_prototypes(self) -> int:
    return 2 * self.num_classes * self.prompts_per_class


class RefinerBlock(nn.Module):
  """Residual block `index` of the refiner: `SiLU(block(x) + skip(x))`, block = 3x3 conv, GN, SiLU,
  Dropout2d, 3x3 conv, GN; skip = 1x1 conv. Parameters live in the refiner's own scope (`nn.share_scope`),
  named `block{index}_conv1`, ... as the reference's `shared_decoder` is exported."""

  config: DualProtoSegConfig
  dtype: Dtype
  index: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cfg, index = self.config, self.index
    width, groups = cfg.refiner_width, cfg.group_norm_groups
    y = layers.conv(width, 3, width, False, self.dtype, f'block{index}_conv1')(x)
    y = nn.silu(layers.group_norm(groups, f'block{index}_norm1')(y))
    # Dropout2d: whole channels are dropped per sample (its name keeps the dropout masks of the unsplit
    # refiner, whose auto-named Dropout_{index} modules drew them).
    y = nn.Dropout(cfg.refiner_dropout, broadcast_dims=(1, 2), deterministic=not train,
                   name=f'Dropout_{index}')(y)
    y = layers.conv(width, 3, width, False, self.dtype, f'block{index}_conv2')(y)
    y = layers.group_norm(groups, f'block{index}_norm2')(y)
    skip = layers.conv(width, 1, width, True, self.dtype, f'block{index}_skip')(x)
    return sharding.with_logical_constraint(nn.silu(y + skip.astype(jnp.float32)), FEATURE_MAP)


class FeatureRefiner(nn.Module):
  """`[N, h, w, D]` -> L2-normalised `[N, h, w, F]` (the reference's `shared_decoder`)."""

  config: DualProtoSegConfig
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    width, groups = cfg.refiner_width, cfg.group_norm_groups
    x = sharding.with_logical_constraint(x, FEATURE_MAP)
    x = layers.conv(width, 1, x.shape[-1], False, self.dtype, 'input_conv')(x)
    x = nn.silu(layers.group_norm(groups, 'input_norm')(x))
    # With `refiner_remat` each residual block is one remat region that keeps only its convolutions'
    # outputs: the f32 GroupNorm / SiLU / dropout intermediates of 4 taps x B maps are recomputed in the
    # backward pass (elementwise work, +0.1 % FLOPs) instead of being held from the forward (-3.9 GiB of
    # saved activations at B = 64, BUILD_NOTES "Speed"). Numerics are unchanged.
    block_cls = (nn.remat(RefinerBlock, policy=jax.checkpoint_policies.dots_saveable, static_argnums=(2,))
                 if cfg.refiner_remat else RefinerBlock)
    for index in range(cfg.refiner_blocks):
      block = block_cls(cfg, self.dtype, index)
      nn.share_scope(self, block)
      x = block(x, train)
    x = layers.conv(cfg.feature_dim, 1, width, False, self.dtype, 'output_conv')(x)
    x = layers.group_norm(groups, 'output_norm')(x)
    return sharding.with_logical_constraint(ops.l2_normalize(x, axis=-1), FEATURE_MAP)


class PyramidLevel(nn.Module):
  """`[B, h, w, F]` -> `[B, s, s, c]` in `dtype`: 1x1 conv, GN, SiLU, 3x3 conv, GN, SiLU, bilinear resize."""

  channels: int
  upsample: int
  groups: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.conv(self.channels, 1, x.shape[-1], False, self.dtype, 'conv1')(x)
    x = nn.silu(layers.group_norm(self.groups, 'norm1')(x))
    x = layers.conv(self.channels, 3, self.channels, False, self.dtype, 'conv2')(x)
    x = nn.silu(layers.group_norm(self.groups, 'norm2')(x))
    out_hw = (x.shape[1] * self.upsample, x.shape[2] * self.upsample)
    return ops.resize_bilinear(x.astype(self.dtype), out_hw, align_corners=False)


class DualProtoSeg(nn.Module):
  """The full network. Use the methods through `model.apply(variables, ..., method=...)`.

  Forward for one training step:
    taps = trunk_taps(images)                      # frozen, once per step
    text_features = text_features(prompt_ids)      # once per step, not per image
    bank = prototype_bank(text_features)           # [P, F]
    pixel_features = pyramid(taps, train)          # 4 x [B, s_i, s_i, c_i], unit norm per pixel
    scores = prototype_scores(pixel_features, bank)  # [4, B, P] = spatial mean of each level's CAM
  """

  config: DualProtoSegConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    if len(cfg.vit.taps) != len(cfg.pyramid_channels) or len(cfg.pyramid_channels) != len(
        cfg.pyramid_upsample):
      raise ValueError(f'model.vit.taps {tuple(cfg.vit.taps)}, model.pyramid_channels '
                       f'{tuple(cfg.pyramid_channels)} and model.pyramid_upsample '
                       f'{tuple(cfg.pyramid_upsample)} must have the same length')
    self.trunk = VisionTransformer(cfg.vit, self.dtype)
    self.text_encoder = TextTransformer(cfg.text, self.dtype)
    self.prompt_learner = PromptLearner(cfg.num_classes, cfg.n_ctx, cfg.text.width)
    self.shared_decoder = FeatureRefiner(cfg, self.dtype)
    self.feature_pyramid = [PyramidLevel(c, u, cfg.group_norm_groups, self.dtype,
                                         name=f'feature_pyramid_{i}')
                            for i, (c, u) in enumerate(zip(cfg.pyramid_channels, cfg.pyramid_upsample))]
    xavier = nn.initializers.xavier_uniform()
    self.text_proj = nn.Dense(cfg.feature_dim, kernel_init=xavier, bias_init=nn.initializers.zeros,
                              param_dtype=jnp.float32)
    self.proto_projections = [nn.Dense(c, use_bias=False, kernel_init=xavier, param_dtype=jnp.float32,
                                       name=f'proto_projections_{i}')
                              for i, c in enumerate(cfg.pyramid_channels)]
    self.learnable_image_prototypes = self.param(
        'learnable_image_prototypes', nn.initializers.normal(cfg.image_prototype_init_std),
        (cfg.num_classes * cfg.prompts_per_class, cfg.feature_dim))
    self.logit_scales = [self.param(f'logit_scale{i + 1}', nn.initializers.constant(cfg.logit_scale_init),
                                    ()) for i in range(len(cfg.pyramid_channels))]

  # --- frozen towers -------------------------------------------------------------------------------
  def trunk_taps(self, images: jax.Array) -> jax.Array:
    """Normalised images `[B, H, W, 3]` -> stacked tap maps `[T, B, h, w, D]` (f32)."""
    return sharding.with_logical_constraint(jnp.stack(self.trunk(images)), STACKED_TAPS)

  def text_features(self, prompt_token_ids: jax.Array) -> jax.Array:
    """Prompt ids `[C*M, L]` -> text features `[C*M, E]`; gradients reach only the prompt context."""
    embeddings = self.text_encoder.embed(prompt_token_ids)
    embeddings = self.prompt_learner(embeddings)
    return ops.l2_normalize(self.text_encoder(embeddings, prompt_token_ids))

  def phrase_prototypes(self, prompt_token_ids: jax.Array, context: jax.Array, level: int) -> jax.Array:
    """Free prompts `[Q, L]` (n_ctx placeholder slots after BOS) with one context `[n_ctx, D]` -> unit
    `[Q, c_level]`: each prompt exactly as a text prototype enters level `level`'s CAM,
    `l2(proto_projections_level(l2(text_proj(text features))))` (the bank's re-normalisation of unit rows
    is left out: a no-op up to rounding)."""
    embeddings = self.text_encoder.embed(prompt_token_ids)
    n_ctx = self.config.n_ctx
    context = jnp.broadcast_to(context.astype(embeddings.dtype), (embeddings.shape[0], n_ctx,
                                                                 embeddings.shape[-1]))
    embeddings = jnp.concatenate([embeddings[:, :1], context, embeddings[:, 1 + n_ctx:]], axis=1)
    text_features = ops.l2_normalize(self.text_encoder(embeddings, prompt_token_ids))
    text_prototypes = ops.l2_normalize(self.text_proj(text_features))
    return ops.l2_normalize(self.proto_projections[level](text_prototypes))

  # --- trainable heads -----------------------------------------------------------------------------
  def prototype_bank(self, text_features: jax.Array) -> jax.Array:
    """`[C*M, E]` -> interleaved, L2-normalised dual-modal bank `[P, F]` (f32)."""
    text_prototypes = ops.l2_normalize(self.text_proj(text_features))
    image_prototypes = ops.l2_normalize(self.learnable_image_prototypes)
    return ops.l2_normalize(ops.interleave(text_prototypes, image_prototypes))

  def pyramid(self, taps: jax.Array, train: bool) -> list[jax.Array]:
    """`[T, B, h, w, D]` -> per-level pixel features `[B, s_i, s_i, c_i]`, unit norm per pixel.

    The shared refiner runs once over all taps stacked along the batch axis.
    """
    num_taps, batch = taps.shape[:2]
    refined = self.shared_decoder(taps.reshape(num_taps * batch, *taps.shape[2:]), train)
    refined = refined.reshape(num_taps, batch, *refined.shape[1:])
    refined = sharding.with_logical_constraint(refined, (None,) + FEATURE_MAP)
    return [sharding.with_logical_constraint(ops.l2_normalize(level(refined[i])), FEATURE_MAP)
            for i, level in enumerate(self.feature_pyramid)]

  def level_prototypes(self, bank: jax.Array) -> list[jax.Array]:
    """`[P, F]` -> per-level projected, L2-normalised prototypes `[P, c_i]` (f32)."""
    return [ops.l2_normalize(projection(bank)) for projection in self.proto_projections]

  def prototype_scores(self, pixel_features: Sequence[jax.Array], bank: jax.Array) -> jax.Array:
    """Spatial mean of each level's CAM, `[L, B, P]` (f32), without materialising the CAMs.

    mean_hw(scale * <x_hw, q>) == scale * <mean_hw(x_hw), q>, so the [B, s, s, P] maps are never built.
    """
    scores = []
    for features, prototypes, scale in zip(pixel_features, self.level_prototypes(bank), self.logit_scales):
      mean_feature = jnp.mean(features, axis=(1, 2), dtype=jnp.float32)
      scores.append(scale * mean_feature @ prototypes.T)
    return jnp.stack(scores)

  def level_cam(self, pixel_features: jax.Array, bank: jax.Array, level: int) -> jax.Array:
    """CAM of one level: `[B, s, s, c]` x bank -> `[B, s, s, P]` (f32) = scale * cosine similarity."""
    prototypes = self.level_prototypes(bank)[level]
    cam = jnp.einsum('bhwc,pc->bhwp', pixel_features, prototypes.astype(pixel_features.dtype),
                     preferred_element_type=jnp.float32)
    return self.logit_scales[level] * cam

  def head_scores(self, taps: jax.Array, prompt_token_ids: jax.Array, train: bool,
                  cam_level: int = -1) -> tuple[jax.Array, jax.Array | None]:
    """Trainable part of the training forward: tap maps `[T, B, h, w, D]` -> scores `[L, B, P]`.

    With `cam_level >= 0` also returns that level's full CAM `[B, s, s, P]` (for the diversity term);
    otherwise `None`, and no CAM is materialised.
    """
    bank = self.prototype_bank(self.text_features(prompt_token_ids))
    pixel_features = self.pyramid(taps, train)
    scores = self.prototype_scores(pixel_features, bank)
    cam = self.level_cam(pixel_features[cam_level], bank, cam_level) if cam_level >= 0 else None
    return scores, cam

  def text_bank(self, prompt_token_ids: jax.Array) -> jax.Array:
    """Prompt ids `[C*M, L]` -> prototype bank `[P, F]`; computed once per evaluation, not per batch."""
    return self.prototype_bank(self.text_features(prompt_token_ids))

  def class_maps(self, images: jax.Array, bank: jax.Array, level: int, merge: str) -> jax.Array:
    """Inference CAMs of one level merged to classes: images `[B, H, W, 3]` -> `[B, s, s, C]` (f32).

    Only the tap that feeds `level` goes through the refiner (the other three are not needed).
    """
    return self.class_maps_and_scores(images, bank, level, merge)[0]

  def level_features(self, images: jax.Array, level: int) -> jax.Array:
    """Inference pixel features of one level: images `[B, H, W, 3]` -> unit `[B, s, s, c]` (compute dtype).

    Only the tap that feeds `level` goes through the refiner (the other three are not needed).
    """
    tap = self.trunk(images)[level]
    refined = self.shared_decoder(tap, False)
    pixel_features = ops.l2_normalize(self.feature_pyramid[level](refined))
    return sharding.with_logical_constraint(pixel_features, FEATURE_MAP)

  def class_maps_and_scores(self, images: jax.Array, bank: jax.Array, level: int,
                            merge: str) -> tuple[jax.Array, jax.Array]:
    """-> (`class_maps` `[B, s, s, C]`, that level's prototype scores `[B, P]` = spatial mean of its CAM,
    the image-level logits the model was trained on)."""
    pixel_features = self.level_features(images, level)
    maps = ops.merge_prototypes(self.level_cam(pixel_features, bank, level), self.config.num_classes, merge)
    prototypes = self.level_prototypes(bank)[level]
    mean_feature = jnp.mean(pixel_features, axis=(1, 2), dtype=jnp.float32)
    return maps, self.logit_scales[level] * mean_feature @ prototypes.T

  def __call__(self, images: jax.Array, prompt_token_ids: jax.Array, train: bool = False) -> jax.Array:
    """Images `[B, H, W, 3]` -> prototype scores `[L, B, P]` (used for init and simple inference)."""
    return self.head_scores(self.trunk_taps(images), prompt_token_ids, train)[0]
