"""PyTorch state dicts (as name -> NumPy array) to Flax parameter trees, with strict key and shape checks.

No torch import: callers load the file (`torch.load`, `safetensors.numpy.load_file`) and pass NumPy arrays.
Every missing key, unexpected key or shape mismatch raises `ValueError` naming the key.
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import numpy as np

from protoseg_jax.models.pos_embed import resample_pos_embed
from protoseg_jax.models.text import TextConfig
from protoseg_jax.models.vit import VitConfig

# timm ViT keys a tapped trunk does not use.
IGNORED_VIT_KEYS = (r'norm\..*', r'fc_norm\..*', r'head\..*', r'head_drop\..*', r'attn_pool\..*')


class _Reader:
  """Takes keys out of a state dict, checking shapes; `finish()` reports what was left unused."""

  def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str, source: str):
    self.arrays = {key[len(prefix):]: np.asarray(value) for key, value in state_dict.items()
                   if key.startswith(prefix)}
    self.used: set[str] = set()
    self.source = source

  def take(self, key: str, shape: tuple) -> np.ndarray:
    if key not in self.arrays:
      raise ValueError(f'{self.source}: key {key!r} is missing')
    value = self.arrays[key]
    if tuple(value.shape) != tuple(shape):
      raise ValueError(f'{self.source}: key {key!r} has shape {tuple(value.shape)}, the config expects '
                       f'{tuple(shape)}')
    self.used.add(key)
    return value.astype(np.float32)

  def finish(self, ignored_patterns=()) -> None:
    surplus = [key for key in sorted(self.arrays) if key not in self.used
               and not any(re.fullmatch(pattern, key) for pattern in ignored_patterns)]
    if surplus:
      raise ValueError(f'{self.source}: unexpected key {surplus[0]!r} ({len(surplus)} unused in all); '
                       f'the checkpoint does not match the config')


def _pos_embed(reader: _Reader, key: str, num_prefix: int, config: VitConfig, squeeze: bool = False):
  """The position table `[1, prefix + G*G, D]`; resized when the file's grid G differs from the config's,
  with `config.pos_embed_resample` (the method the forward uses, default timm's anti-aliased bicubic)."""
  if key not in reader.arrays:
    raise ValueError(f'{reader.source}: key {key!r} is missing')
  table = np.asarray(reader.arrays[key], np.float32)
  table = table[None] if squeeze else table
  tokens = table.shape[1] - num_prefix
  side = int(round(np.sqrt(max(tokens, 0))))
  if table.ndim != 3 or table.shape[2] != config.width or side * side != tokens:
    raise ValueError(f'{reader.source}: key {key!r} has shape {tuple(np.shape(reader.arrays[key]))}, not a '
                     f'square position table of width {config.width}')
  reader.used.add(key)
  if side == config.pos_embed_grid:
    return table
  logging.info('%s: resizing position embeddings %dx%d -> %dx%d (%s; config.model.vit.pos_embed_grid)',
               reader.source, side, side, config.pos_embed_grid, config.pos_embed_grid,
               config.pos_embed_resample)
  grid = (config.pos_embed_grid, config.pos_embed_grid)
  return np.asarray(resample_pos_embed(table, num_prefix, grid, config.pos_embed_resample), np.float32)


def _linear(reader: _Reader, key: str, in_features: int, out_features: int, bias: bool = True) -> dict:
  out = {'kernel': reader.take(f'{key}.weight', (out_features, in_features)).T}
  if bias:
    out['bias'] = reader.take(f'{key}.bias', (out_features,))
  return out


def _fused_qkv(reader: _Reader, key: str, width: int) -> dict:
  """HF's separate `{q,k,v}_proj` linears -> one fused `[width, 3 * width]` projection (q, k, v order)."""
  q, k, v = (_linear(reader, f'{key}.{part}_proj', width, width) for part in ('q', 'k', 'v'))
  return {'kernel': np.concatenate([q['kernel'], k['kernel'], v['kernel']], axis=1),
          'bias': np.concatenate([q['bias'], k['bias'], v['bias']])}


def _norm(reader: _Reader, key: str, width: int) -> dict:
  return {'scale': reader.take(f'{key}.weight', (width,)), 'bias': reader.take(f'{key}.bias', (width,))}


def vit_from_timm(state_dict: Mapping[str, np.ndarray], config: VitConfig, prefix: str = '') -> dict:
  """timm `VisionTransformer` state dict -> params of `VisionTransformer` (blocks up to the last tap)."""
  reader = _Reader(state_dict, prefix, 'timm ViT checkpoint')
  width, patch = config.width, config.patch_size
  hidden = int(width * config.mlp_ratio)
  num_prefix = 1 if config.class_token else 0
  params = {
      'patch_embed': {'kernel': reader.take('patch_embed.proj.weight', (width, 3, patch, patch)).transpose(
          2, 3, 1, 0), 'bias': reader.take('patch_embed.proj.bias', (width,))},
      'pos_embed': _pos_embed(reader, 'pos_embed', num_prefix, config),
  }
  if config.class_token:
    params['cls_token'] = reader.take('cls_token', (1, 1, width))
  last = max(config.taps)
  for index in range(config.depth):
    name = f'blocks.{index}'
    if index > last:  # not built: nothing reads blocks after the last tap
      reader.used.update(key for key in reader.arrays if key.startswith(name + '.'))
      continue
    block = {
        'norm1': _norm(reader, f'{name}.norm1', width),
        'attn': {'qkv': _linear(reader, f'{name}.attn.qkv', width, 3 * width, config.qkv_bias),
                 'proj': _linear(reader, f'{name}.attn.proj', width, width)},
        'norm2': _norm(reader, f'{name}.norm2', width),
        'mlp': {'fc1': _linear(reader, f'{name}.mlp.fc1', width, hidden),
                'fc2': _linear(reader, f'{name}.mlp.fc2', hidden, width)},
    }
    if config.layer_scale_init is not None:
      block['ls1'] = {'gamma': reader.take(f'{name}.ls1.gamma', (width,))}
      block['ls2'] = {'gamma': reader.take(f'{name}.ls2.gamma', (width,))}
    params[f'blocks_{index}'] = block
  reader.finish(IGNORED_VIT_KEYS)
  return params


def text_from_hf_clip(state_dict: Mapping[str, np.ndarray], config: TextConfig,
                      prefix: str = 'text_model.', projection_key: str = 'text_projection.weight') -> dict:
  """transformers `CLIPModel` / `CLIPTextModelWithProjection` text weights -> params of `TextTransformer`."""
  reader = _Reader(state_dict, prefix, 'HF CLIP text checkpoint')
  width, hidden = config.width, int(config.width * config.mlp_ratio)
  params = {
      'token_embedding': {'embedding': reader.take('embeddings.token_embedding.weight',
                                                   (config.vocab_size, width))},
      'positional_embedding': reader.take('embeddings.position_embedding.weight',
                                          (config.context_table, width)),
      'ln_final': _norm(reader, 'final_layer_norm', width),
  }
  for index in range(config.depth):
    name = f'encoder.layers.{index}'
    params[f'resblocks_{index}'] = {
        'ln_1': _norm(reader, f'{name}.layer_norm1', width),
        'attn': {'in_proj': _fused_qkv(reader, f'{name}.self_attn', width),
                 'out_proj': _linear(reader, f'{name}.self_attn.out_proj', width, width)},
        'ln_2': _norm(reader, f'{name}.layer_norm2', width),
        'c_fc': _linear(reader, f'{name}.mlp.fc1', width, hidden),
        'c_proj': _linear(reader, f'{name}.mlp.fc2', hidden, width),
    }
  reader.finish((r'embeddings\.position_ids',))
  projection = _Reader(state_dict, '', 'HF CLIP text checkpoint')
  params['text_projection'] = projection.take(projection_key, (config.embed_dim, width)).T
  return params


# CONCH (open_clip CoCa) keys outside the two towers DualProtoSeg uses: attentional poolers, the caption
# decoder, the contrastive projection and temperature, and the text tower's CLS embedding (the reference
# code's text forward never appends it).
IGNORED_CONCH_KEYS = (r'visual\.attn_pool_contrast\..*', r'visual\.ln_contrast\..*', r'visual\.proj_contrast',
                      r'visual\.attn_pool_caption\..*', r'visual\.ln_caption\..*', r'visual\.head\..*',
                      r'text_decoder\..*', r'logit_scale', r'text\.cls_emb', r'text\.attn_mask')


def text_from_open_clip(state_dict: Mapping[str, np.ndarray], config: TextConfig,
                        prefix: str = 'text.') -> dict:
  """open_clip / CONCH `TextTransformer` weights (`token_embedding`, `transformer.resblocks.*`, ...)."""
  reader = _Reader(state_dict, prefix, 'open_clip text checkpoint')
  width, hidden = config.width, int(config.width * config.mlp_ratio)
  params = {
      'token_embedding': {'embedding': reader.take('token_embedding.weight', (config.vocab_size, width))},
      'positional_embedding': reader.take('positional_embedding', (config.context_table, width)),
      'ln_final': _norm(reader, 'ln_final', width),
      'text_projection': reader.take('text_projection', (width, config.embed_dim)),
  }
  for index in range(config.depth):
    name = f'transformer.resblocks.{index}'
    params[f'resblocks_{index}'] = {
        'ln_1': _norm(reader, f'{name}.ln_1', width),
        'attn': {'in_proj': {'kernel': reader.take(f'{name}.attn.in_proj_weight', (3 * width, width)).T,
                             'bias': reader.take(f'{name}.attn.in_proj_bias', (3 * width,))},
                 'out_proj': _linear(reader, f'{name}.attn.out_proj', width, width)},
        'ln_2': _norm(reader, f'{name}.ln_2', width),
        'c_fc': _linear(reader, f'{name}.mlp.c_fc', width, hidden),
        'c_proj': _linear(reader, f'{name}.mlp.c_proj', hidden, width),
    }
  reader.finish((r'cls_emb', r'attn_mask'))
  return params


def towers_from_conch(state_dict: Mapping[str, np.ndarray], vit: VitConfig, text: TextConfig) -> dict:
  """A CONCH / open_clip CoCa checkpoint -> `{'trunk': ..., 'text_encoder': ...}`.

  Every key must be used by a tower or be one of the known unused CoCa heads (`IGNORED_CONCH_KEYS`).
  """
  towers = {'trunk': vit_from_timm(state_dict, vit, prefix='visual.trunk.'),
            'text_encoder': text_from_open_clip(state_dict, text, prefix='text.')}
  towers_prefixes = ('visual.trunk.', 'text.')
  surplus = [key for key in sorted(state_dict) if not key.startswith(towers_prefixes)
             and not any(re.fullmatch(pattern, key) for pattern in IGNORED_CONCH_KEYS)]
  if surplus:
    raise ValueError(f'CONCH checkpoint: unexpected key {surplus[0]!r} ({len(surplus)} unknown in all); '
                     'is this an open_clip CoCa / CONCH state dict?')
  return towers


def vit_from_hf_clip(state_dict: Mapping[str, np.ndarray], config: VitConfig,
                     prefix: str = 'vision_model.') -> dict:
  """transformers `CLIPVisionModel` weights -> a `pre_norm=True` trunk (blocks up to the last tap)."""
  if not config.pre_norm or not config.class_token:
    raise ValueError('HF CLIP vision towers need config.model.vit.pre_norm=True and class_token=True')
  reader = _Reader(state_dict, prefix, 'HF CLIP vision checkpoint')
  width, patch = config.width, config.patch_size
  hidden = int(width * config.mlp_ratio)
  params = {
      'patch_embed': {'kernel': reader.take('embeddings.patch_embedding.weight',
                                            (width, 3, patch, patch)).transpose(2, 3, 1, 0)},
      'cls_token': reader.take('embeddings.class_embedding', (width,)).reshape(1, 1, width),
      'pos_embed': _pos_embed(reader, 'embeddings.position_embedding.weight', 1, config, squeeze=True),
      'norm_pre': _norm(reader, 'pre_layrnorm', width),
  }
  last = max(config.taps)
  for index in range(config.depth):
    name = f'encoder.layers.{index}'
    if index > last:
      reader.used.update(key for key in reader.arrays if key.startswith(name + '.'))
      continue
    params[f'blocks_{index}'] = {
        'norm1': _norm(reader, f'{name}.layer_norm1', width),
        'attn': {'qkv': _fused_qkv(reader, f'{name}.self_attn', width),
                 'proj': _linear(reader, f'{name}.self_attn.out_proj', width, width)},
        'norm2': _norm(reader, f'{name}.layer_norm2', width),
        'mlp': {'fc1': _linear(reader, f'{name}.mlp.fc1', width, hidden),
                'fc2': _linear(reader, f'{name}.mlp.fc2', hidden, width)},
    }
  reader.finish((r'embeddings\.position_ids', r'post_layernorm\..*'))
  return params
