"""MPAMatch segmenter: a ViT trunk (UNI ViT-L/16 sizes) + TransUNet's cascaded upsampler, a segmentation
head, a pixel-embedding (projection) head, and the text branch (frozen text tower + CoOp prompt learner +
adapter) that gives one text prototype per class.

Top-level parameter collections: `encoder` (ViT, fine-tuned at a low LR), `encoder_norm`, `decoder`,
`embed_head`, `text_encoder` (frozen), `prompt_learner`, `text_adapter`. BatchNorm statistics live in the
`batch_stats` collection (decoder and embedding head).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from protoseg_jax import ops
from protoseg_jax.models import layers
from protoseg_jax.models.text import PromptLearner, TextConfig, TextTransformer
from protoseg_jax.models.vit import VisionTransformer, VitConfig

Dtype = Any
FROZEN_COLLECTIONS = ('text_encoder',)
ENCODER_COLLECTIONS = ('encoder', 'encoder_norm')


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
  """Sizes of the MPAMatch model; `decoder_channels` has one entry per x2 upsampling (log2 patch size)."""

  vit: VitConfig
  text: TextConfig
  num_classes: int
  bottleneck_channels: int = 512
  decoder_channels: tuple = (256, 128, 64, 16)
  batch_norm_momentum: float = 0.9
  fp_dropout: float = 0.5
  embed_level: int = 2
  embed_hidden: int = 256
  embed_dim: int = 512
  n_ctx: int = 4

  def __post_init__(self):
    blocks = int(round(math.log2(self.vit.patch_size)))
    if 2 ** blocks != self.vit.patch_size or len(self.decoder_channels) != blocks:
      raise ValueError(f'config.model.decoder_channels needs one entry per x2 upsampling back to full '
                       f'resolution: {blocks} for patch size {self.vit.patch_size} (a power of two), got '
                       f'{len(self.decoder_channels)}')
    if not 1 <= self.embed_level <= blocks:
      raise ValueError(f'config.model.embed_level={self.embed_level} must be in 1..{blocks}')
    if tuple(self.vit.taps) != (self.vit.depth - 1,):
      raise ValueError(f'config.model.vit.taps must be ({self.vit.depth - 1},): the decoder reads the last '
                       f'block, got {tuple(self.vit.taps)}')

  @property
  def embed_stride(self) -> int:
    """Input pixels per embedding-map pixel along each axis."""
    return self.vit.patch_size // 2 ** self.embed_level


class ConvBnRelu(nn.Module):
  """3x3 (or k x k) conv without bias, BatchNorm, ReLU (TransUNet's `Conv2dReLU`)."""

  features: int
  in_features: int
  momentum: float
  dtype: Dtype
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = layers.conv(self.features, self.kernel_size, self.in_features, False, self.dtype, 'conv')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=1e-5,
                     dtype=jnp.float32, name='bn')(x)
    return nn.relu(x)


class CascadedUpsampler(nn.Module):
  """TransUNet's CUP: `[B, h, w, D]` -> (features `[B, h*2^n, w*2^n, c_n]`, tapped `[B, ., ., c_level]`).

  3x3 conv D -> bottleneck (BN, ReLU), then per block: bilinear x2 (align_corners=True, as
  `UpsamplingBilinear2d`), two [3x3 conv, BN, ReLU].
  """

  config: SegmenterConfig
  dtype: Dtype

  @nn.compact
  def __call__(self, features: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    x = ConvBnRelu(cfg.bottleneck_channels, features.shape[-1], cfg.batch_norm_momentum, self.dtype,
                   name='conv_more')(features.astype(self.dtype), train)
    tapped = None
    in_features = cfg.bottleneck_channels
    for index, channels in enumerate(cfg.decoder_channels):
      height, width = x.shape[1:3]
      x = ops.resize_bilinear(x.astype(self.dtype), (2 * height, 2 * width), align_corners=True)
      x = ConvBnRelu(channels, in_features, cfg.batch_norm_momentum, self.dtype,
                     name=f'block{index}_conv1')(x, train)
      x = ConvBnRelu(channels, channels, cfg.batch_norm_momentum, self.dtype,
                     name=f'block{index}_conv2')(x, train)
      in_features = channels
      if index + 1 == cfg.embed_level:
        tapped = x
    return x, tapped


class EmbeddingHead(nn.Module):
  """1x1 conv -> BN -> ReLU -> 1x1 conv -> L2 normalise: `[B, h, w, c]` -> `[B, h, w, E]` unit f32."""

  hidden: int
  embed_dim: int
  momentum: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = ConvBnRelu(self.hidden, x.shape[-1], self.momentum, self.dtype, kernel_size=1, name='proj1')(x, train)
    x = layers.conv(self.embed_dim, 1, self.hidden, True, self.dtype, 'proj2')(x)
    return ops.l2_normalize(x.astype(jnp.float32))


def _identity_or_default(key, shape, dtype=jnp.float32):
  """Identity for a square kernel (the text adapter starts as a no-op), PyTorch default otherwise."""
  if shape[0] == shape[1]:
    return jnp.eye(shape[0], dtype=dtype)
  return layers.torch_default_kernel_init(key, shape, dtype)


class MPAMatchModel(nn.Module):
  """See the module docstring. Images are normalised `[B, H, W, 3]`; H, W multiples of the patch size."""

  config: SegmenterConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = VisionTransformer(cfg.vit, self.dtype)
    self.encoder_norm = nn.LayerNorm(epsilon=cfg.vit.layer_norm_eps, dtype=jnp.float32,
                                     param_dtype=jnp.float32)
    self.decoder = CascadedUpsampler(cfg, self.dtype)
    self.seg_head = nn.Conv(cfg.num_classes, (3, 3), padding='SAME', dtype=self.dtype,
                            param_dtype=jnp.float32, kernel_init=layers.torch_default_kernel_init,
                            bias_init=layers.torch_default_bias_init(cfg.decoder_channels[-1] * 9))
    self.embed_head = EmbeddingHead(cfg.embed_hidden, cfg.embed_dim, cfg.batch_norm_momentum, self.dtype)
    self.fp_dropout = nn.Dropout(cfg.fp_dropout, broadcast_dims=(1, 2), deterministic=False)
    self.text_encoder = TextTransformer(cfg.text, self.dtype)
    self.prompt_learner = PromptLearner(cfg.num_classes, cfg.n_ctx, cfg.text.width)
    self.text_adapter = nn.Dense(cfg.embed_dim, param_dtype=jnp.float32, kernel_init=_identity_or_default,
                                 bias_init=nn.initializers.zeros)

  def encode(self, images: jax.Array) -> jax.Array:
    """`[B, H, W, 3]` -> final-normed patch tokens `[B, H/p, W/p, D]` f32 (class token dropped)."""
    (tokens,) = self.encoder(images)
    return self.encoder_norm(tokens)

  def decode(self, features: jax.Array, train: bool,
             with_embeddings: bool = True) -> tuple[jax.Array, Optional[jax.Array]]:
    """`[B, h, w, D]` -> (logits `[B, H, W, C]` f32, unit embeddings `[B, H/s, W/s, E]` f32 or None)."""
    x, tapped = self.decoder(features, train)
    logits = self.seg_head(x).astype(jnp.float32)
    embeddings = self.embed_head(tapped, train) if with_embeddings else None
    return logits, embeddings

  def segment(self, images: jax.Array, train: bool, feature_perturbation: bool = False,
              with_embeddings: bool = True) -> tuple[jax.Array, Optional[jax.Array]]:
    """Images `[B, H, W, 3]` -> (logits, embeddings) as `decode`.

    With `feature_perturbation` the decoder runs on `[f; dropout2d(f)]` (UniMatch's FP stream, needs a
    'dropout' rng): outputs have 2B rows, the perturbed half second.
    """
    return self.segment_features(self.encode(images), train, feature_perturbation, with_embeddings)

  def segment_features(self, features: jax.Array, train: bool, feature_perturbation: bool = False,
                       with_embeddings: bool = True) -> tuple[jax.Array, Optional[jax.Array]]:
    """`segment` from encoder features `[B, h, w, D]` (the output of `encode`)."""
    if feature_perturbation:
      features = jnp.concatenate([features, self.fp_dropout(features)], axis=0)
    return self.decode(features, train, with_embeddings)

  def text_prototypes(self, prompt_ids: jax.Array) -> jax.Array:
    """Prompt ids `[C, L]` (one prompt per class) -> unit text prototypes `[C, E]` f32."""
    embeddings = self.prompt_learner(self.text_encoder.embed(prompt_ids))
    text = self.text_encoder(embeddings, prompt_ids)
    return ops.l2_normalize(self.text_adapter(text.astype(jnp.float32)))

  def phrase_prototypes(self, prompt_ids: jax.Array, context: jax.Array) -> jax.Array:
    """Free prompts `[Q, L]` (n_ctx placeholder slots after BOS) with one context `[n_ctx, D]` -> unit
    `[Q, E]` f32, each exactly as `text_prototypes` makes a class's prototype."""
    embeddings = self.text_encoder.embed(prompt_ids)
    n_ctx = self.config.n_ctx
    context = jnp.broadcast_to(context.astype(embeddings.dtype), (embeddings.shape[0], n_ctx,
                                                                 embeddings.shape[-1]))
    embeddings = jnp.concatenate([embeddings[:, :1], context, embeddings[:, 1 + n_ctx:]], axis=1)
    text = self.text_encoder(embeddings, prompt_ids)
    return ops.l2_normalize(self.text_adapter(text.astype(jnp.float32)))

  def __call__(self, images: jax.Array, prompt_ids: jax.Array, train: bool = False):
    """Everything at once (used by `init` so that every parameter is created)."""
    logits, embeddings = self.segment(images, train, feature_perturbation=True)
    return logits, embeddings, self.text_prototypes(prompt_ids)
