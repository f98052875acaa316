"""Shared towers -> PyTorch state dicts: a ViT trunk as timm's `VisionTransformer`, a text tower with
open_clip / CONCH names. Layouts are torch's: conv kernels OIHW, linear weights `[out, in]`. Method exports
(`protoseg_jax/methods/*/export.py`) build on these.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from protoseg_jax.models.text import TextConfig
from protoseg_jax.models.vit import VitConfig


def conv_oihw(kernel) -> np.ndarray:
  """Flax HWIO conv kernel -> torch OIHW."""
  return np.ascontiguousarray(np.asarray(kernel, np.float32).transpose(3, 2, 0, 1))


def linear(dense: Mapping, prefix: str, out: dict) -> None:
  """A Flax Dense (`kernel` `[in, out]`, optional `bias`) -> `<prefix>.weight` `[out, in]` (+ `.bias`)."""
  out[f'{prefix}.weight'] = np.ascontiguousarray(np.asarray(dense['kernel'], np.float32).T)
  if 'bias' in dense:
    out[f'{prefix}.bias'] = np.asarray(dense['bias'], np.float32)


def norm(params: Mapping, prefix: str, out: dict) -> None:
  """A Flax LayerNorm / GroupNorm (`scale`, `bias`) -> `<prefix>.weight`, `<prefix>.bias`."""
  out[f'{prefix}.weight'] = np.asarray(params['scale'], np.float32)
  out[f'{prefix}.bias'] = np.asarray(params['bias'], np.float32)


def trunk_to_timm(trunk: Mapping, config: VitConfig, final_norm: Mapping | None = None) -> dict:
  """Trunk params -> timm `VisionTransformer(num_classes=0, global_pool='token')` state dict.

  Only the blocks up to the last tap exist in the Flax trunk; exporting a trunk whose depth exceeds them
  would silently drop blocks, so that is refused. `final_norm` ({'weight', 'bias'}) defaults to the identity.
  """
  if max(config.taps) != config.depth - 1:
    raise ValueError(f'config.model.vit: the last tap ({max(config.taps)}) is not the last block '
                     f'({config.depth - 1}); the Flax trunk does not hold blocks after it')
  out = {'patch_embed.proj.weight': conv_oihw(trunk['patch_embed']['kernel']),
         'pos_embed': np.asarray(trunk['pos_embed'], np.float32)}
  if 'bias' in trunk['patch_embed']:
    out['patch_embed.proj.bias'] = np.asarray(trunk['patch_embed']['bias'], np.float32)
  if config.class_token:
    out['cls_token'] = np.asarray(trunk['cls_token'], np.float32)
  if config.pre_norm:
    norm(trunk['norm_pre'], 'norm_pre', out)
  for index in range(config.depth):
    block, name = trunk[f'blocks_{index}'], f'blocks.{index}'
    norm(block['norm1'], f'{name}.norm1', out)
    linear(block['attn']['qkv'], f'{name}.attn.qkv', out)
    linear(block['attn']['proj'], f'{name}.attn.proj', out)
    norm(block['norm2'], f'{name}.norm2', out)
    linear(block['mlp']['fc1'], f'{name}.mlp.fc1', out)
    linear(block['mlp']['fc2'], f'{name}.mlp.fc2', out)
    if config.layer_scale_init is not None:
      out[f'{name}.ls1.gamma'] = np.asarray(block['ls1']['gamma'], np.float32)
      out[f'{name}.ls2.gamma'] = np.asarray(block['ls2']['gamma'], np.float32)
  if final_norm is None:
    final_norm = {'weight': np.ones(config.width, np.float32), 'bias': np.zeros(config.width, np.float32)}
  out['norm.weight'] = np.asarray(final_norm['weight'], np.float32)
  out['norm.bias'] = np.asarray(final_norm['bias'], np.float32)
  return out


def text_to_open_clip(text: Mapping, config: TextConfig, context: np.ndarray | None = None) -> dict:
  """Text tower params -> open_clip / CONCH `TextTransformer` names; `context` `[C, n_ctx, D]` rows are
  appended to the token table as the reference prompt learner does."""
  table = np.asarray(text['token_embedding']['embedding'], np.float32)
  if context is not None:
    table = np.concatenate([table, np.asarray(context, np.float32).reshape(-1, table.shape[1])])
  out = {'token_embedding.weight': table,
         'positional_embedding': np.asarray(text['positional_embedding'], np.float32),
         'text_projection': np.asarray(text['text_projection'], np.float32)}
  norm(text['ln_final'], 'ln_final', out)
  for index in range(config.depth):
    block, name = text[f'resblocks_{index}'], f'transformer.resblocks.{index}'
    norm(block['ln_1'], f'{name}.ln_1', out)
    out[f'{name}.attn.in_proj_weight'] = np.ascontiguousarray(
        np.asarray(block['attn']['in_proj']['kernel'], np.float32).T)
    out[f'{name}.attn.in_proj_bias'] = np.asarray(block['attn']['in_proj']['bias'], np.float32)
    linear(block['attn']['out_proj'], f'{name}.attn.out_proj', out)
    norm(block['ln_2'], f'{name}.ln_2', out)
    linear(block['c_fc'], f'{name}.mlp.c_fc', out)
    linear(block['c_proj'], f'{name}.mlp.c_proj', out)
  return out
