"""Pretrained frozen towers from local files, chosen by `config.backbone` (no network, ever).

  source='conch'   one open_clip CoCa checkpoint file (CONCH `pytorch_model.bin` or .safetensors)
  source='hf_clip' a transformers `CLIPModel` folder: config.json + model.safetensors / pytorch_model.bin
  source='timm'    a timm `VisionTransformer` state dict for the trunk; the text tower from
                   `text_source`/`text_path` ('conch' file or 'hf_clip' folder), or random when empty

Returns `{'trunk': params, 'text_encoder': params}` (either may be absent = keep the random init). Every key
and shape is checked by `torch_to_flax`; a mismatch is a `ValueError` naming the key.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from protoseg_jax.convert import torch_files, torch_to_flax
from protoseg_jax.models.text import TextConfig
from protoseg_jax.models.vit import VitConfig

SOURCES = ('none', 'conch', 'hf_clip', 'timm')
_HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


def hf_clip_weights_file(folder: str) -> str:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'HF CLIP folder {folder} does not exist (config.backbone.path)')
  for name in _HF_WEIGHT_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise FileNotFoundError(f'{folder}: no {" or ".join(_HF_WEIGHT_FILES)} (config.backbone.path)')


def check_hf_clip_sizes(folder: str, vit: VitConfig, text: TextConfig) -> None:
  """Compares the folder's config.json with the model config; names the first differing size."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{folder}: no config.json (config.backbone.path)')
  with open(path) as handle:
    hf = json.load(handle)
  vision, language = hf.get('vision_config', {}), hf.get('text_config', {})
  expected = {
      'vision_config.hidden_size': (vision.get('hidden_size'), vit.width, 'config.model.vit.width'),
      'vision_config.patch_size': (vision.get('patch_size'), vit.patch_size, 'config.model.vit.patch_size'),
      'vision_config.num_attention_heads': (vision.get('num_attention_heads'), vit.num_heads,
                                            'config.model.vit.num_heads'),
      'text_config.hidden_size': (language.get('hidden_size'), text.width, 'config.model.text.width'),
      'text_config.num_attention_heads': (language.get('num_attention_heads'), text.num_heads,
                                          'config.model.text.num_heads'),
      'text_config.vocab_size': (language.get('vocab_size'), text.vocab_size,
                                 'config.model.text.vocab_size'),
      'projection_dim': (hf.get('projection_dim'), text.embed_dim, 'config.model.text.embed_dim'),
  }
  for key, (found, wanted, config_key) in expected.items():
    if found is not None and found != wanted:
      raise ValueError(f'{path}: {key} is {found} but {config_key} is {wanted}')
  hf_activation = vision.get('hidden_act')
  if hf_activation is not None and hf_activation != vit.activation.replace('gelu_tanh', 'gelu_pytorch_tanh'):
    raise ValueError(f'{path}: vision hidden_act is {hf_activation!r} but config.model.vit.activation is '
                     f'{vit.activation!r}')


def text_tower(source: str, path: str, vit: VitConfig, text: TextConfig, key: str) -> dict:
  """The text tower alone from a CONCH file ('conch') or an HF CLIP folder ('hf_clip')."""
  if source == 'conch':
    return torch_to_flax.text_from_open_clip(torch_files.load_state_dict(path, key), text, prefix='text.')
  if source == 'hf_clip':
    check_hf_clip_sizes(path, vit, text)
    state = torch_files.load_state_dict(hf_clip_weights_file(path), key)
    return torch_to_flax.text_from_hf_clip(state, text)
  raise ValueError(f"config.backbone.text_source must be 'conch', 'hf_clip' or '', got {source!r}")


def load_towers(backbone: ml_collections.ConfigDict, vit: VitConfig, text: TextConfig) -> dict:
  """`{'trunk': ..., 'text_encoder': ...}` NumPy params from the files `backbone` names."""
  source, path, key = backbone.source, backbone.path, backbone.get('checkpoint_key', '')
  if source not in SOURCES:
    raise ValueError(f'config.backbone.source must be one of {SOURCES}, got {source!r}')
  if source == 'none':
    return {}
  if not path:
    raise ValueError(f'config.backbone.path is empty (config.backbone.source={source!r})')
  if source == 'conch':
    return torch_to_flax.towers_from_conch(torch_files.load_state_dict(path, key), vit, text)
  if source == 'hf_clip':
    check_hf_clip_sizes(path, vit, text)
    state = torch_files.load_state_dict(hf_clip_weights_file(path), key)
    towers = {'trunk': torch_to_flax.vit_from_hf_clip(state, vit),
              'text_encoder': torch_to_flax.text_from_hf_clip(state, text)}
    known = ('vision_model.', 'text_model.', 'text_projection.weight', 'visual_projection.weight',
             'logit_scale')
    surplus = sorted(name for name in state if not name.startswith(known))
    if surplus:
      raise ValueError(f'HF CLIP checkpoint: unexpected key {surplus[0]!r} ({len(surplus)} unknown in all)')
    return towers
  towers = {'trunk': torch_to_flax.vit_from_timm(torch_files.load_state_dict(path, key), vit)}
  if backbone.get('text_source', ''):
    if not backbone.get('text_path', ''):
      raise ValueError('config.backbone.text_path is empty (config.backbone.text_source is set)')
    towers['text_encoder'] = text_tower(backbone.text_source, backbone.text_path, vit, text, key)
  return towers


def as_float32(tree: dict) -> dict:
  return {name: as_float32(value) if isinstance(value, dict) else np.asarray(value, np.float32)
          for name, value in tree.items()}


def check_same_structure(name: str, expected: dict, loaded: dict) -> None:
  """The converters build exactly the module's tree; this guards the two against drifting apart."""
  import jax  # pylint: disable=g-import-not-at-top

  def shapes(tree):
    return {jax.tree_util.keystr(path, simple=True, separator='/'): np.shape(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  want, got = shapes(expected), shapes(loaded)
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise ValueError(f'imported {name}: parameter {key} is {got.get(key)} in the checkpoint, '
                       f'{want.get(key)} in the model (config.backbone)')
