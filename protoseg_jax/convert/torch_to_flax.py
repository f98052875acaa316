"""PyTorch state dicts (as name -> NumPy array) to Flax parameter trees, with strict key and shape checks.

No torch import: callers load the file (`torch.load`, `safetensors.numpy.load_file`) and pass NumPy arrays.
Every missing key, unexpected key or shape mismatch raises `ValueError` naming the key.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

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


def _linear(reader: _Reader, key: str, in_features: int, out_features: int, bias: bool = True) -> dict:
  out = {'kernel': reader.take(f'{key}.weight', (out_features, in_features)).T}
  if bias:
    out['bias'] = reader.take(f'{key}.bias', (out_features,))
  return out


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
      'pos_embed': reader.take('pos_embed', (1, num_prefix + config.pos_embed_grid ** 2, width)),
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
    q, k, v = (_linear(reader, f'{name}.self_attn.{p}_proj', width, width) for p in ('q', 'k', 'v'))
    params[f'resblocks_{index}'] = {
        'ln_1': _norm(reader, f'{name}.layer_norm1', width),
        'attn': {'in_proj': {'kernel': np.concatenate([q['kernel'], k['kernel'], v['kernel']], axis=1),
                             'bias': np.concatenate([q['bias'], k['bias'], v['bias']])},
                 'out_proj': _linear(reader, f'{name}.self_attn.out_proj', width, width)},
        'ln_2': _norm(reader, f'{name}.layer_norm2', width),
        'c_fc': _linear(reader, f'{name}.mlp.fc1', width, hidden),
        'c_proj': _linear(reader, f'{name}.mlp.fc2', hidden, width),
    }
  reader.finish((r'embeddings\.position_ids',))
  projection = _Reader(state_dict, '', 'HF CLIP text checkpoint')
  params['text_projection'] = projection.take(projection_key, (config.embed_dim, width)).T
  return params
