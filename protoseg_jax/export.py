"""Trained parameters -> PyTorch-loadable safetensors, named as the authors' `ClsNetwork`, plus the trunk alone
as a timm `VisionTransformer` state dict.

  python -m protoseg_jax.export --config=configs/bcss.py --workdir=DIR [--checkpoint=best|last] [--out=DIR]

writes `<out>/dualprotoseg.safetensors` (the full network), `<out>/trunk_timm.safetensors` (timm ViT) and
`<out>/export_config.json` (the config and the tensor-name conventions). Layouts: conv kernels OIHW, linear
weights [out, in], as torch stores them.

Tensors the Flax model does not hold are handled so that the reference's `load_state_dict` finds every key:
  - the CoCa parts outside the two towers (attentional poolers, caption decoder, ...), the trunk's final
    `norm` and the text `cls_emb` are copied from the original checkpoint (`config.backbone.path`) when the
    towers were imported from one; with random towers ('none') the timm `norm` is written as the identity;
  - the reference appends the C * n_ctx learned context rows to the text token table (its prompt learner
    extends the vocabulary); they are written there too, equal to `prompt_learner.ctx`;
  - `global_img_proj.weight` (identity), `contrastive_temperature` (0.1) and `clip_adapter.visual_proj`
    (identity, zero bias): the unused contrastive branch's parameters at their initial values.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import ml_collections
import numpy as np

from protoseg_jax.models.dualprotoseg import DualProtoSegConfig
from protoseg_jax.models.text import TextConfig
from protoseg_jax.models.vit import VitConfig

CONTRASTIVE_TEMPERATURE_INIT = 0.1   # the reference ClsNetwork's initial value (unused branch)
VISUAL_PROJECTION_DIM = 512          # the reference ConchAdapter.visual_proj output width (unused)


def conv_oihw(kernel) -> np.ndarray:
  """Flax HWIO conv kernel -> torch OIHW."""
  return np.ascontiguousarray(np.asarray(kernel, np.float32).transpose(3, 2, 0, 1))


def _linear(dense: Mapping, prefix: str, out: dict) -> None:
  out[f'{prefix}.weight'] = np.ascontiguousarray(np.asarray(dense['kernel'], np.float32).T)
  if 'bias' in dense:
    out[f'{prefix}.bias'] = np.asarray(dense['bias'], np.float32)


def _norm(norm: Mapping, prefix: str, out: dict) -> None:
  out[f'{prefix}.weight'] = np.asarray(norm['scale'], np.float32)
  out[f'{prefix}.bias'] = np.asarray(norm['bias'], np.float32)


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
    _norm(trunk['norm_pre'], 'norm_pre', out)
  for index in range(config.depth):
    block, name = trunk[f'blocks_{index}'], f'blocks.{index}'
    _norm(block['norm1'], f'{name}.norm1', out)
    _linear(block['attn']['qkv'], f'{name}.attn.qkv', out)
    _linear(block['attn']['proj'], f'{name}.attn.proj', out)
    _norm(block['norm2'], f'{name}.norm2', out)
    _linear(block['mlp']['fc1'], f'{name}.mlp.fc1', out)
    _linear(block['mlp']['fc2'], f'{name}.mlp.fc2', out)
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
  _norm(text['ln_final'], 'ln_final', out)
  for index in range(config.depth):
    block, name = text[f'resblocks_{index}'], f'transformer.resblocks.{index}'
    _norm(block['ln_1'], f'{name}.ln_1', out)
    out[f'{name}.attn.in_proj_weight'] = np.ascontiguousarray(
        np.asarray(block['attn']['in_proj']['kernel'], np.float32).T)
    out[f'{name}.attn.in_proj_bias'] = np.asarray(block['attn']['in_proj']['bias'], np.float32)
    _linear(block['attn']['out_proj'], f'{name}.attn.out_proj', out)
    _norm(block['ln_2'], f'{name}.ln_2', out)
    _linear(block['c_fc'], f'{name}.mlp.c_fc', out)
    _linear(block['c_proj'], f'{name}.mlp.c_proj', out)
  return out


def heads_to_reference(params: Mapping, config: DualProtoSegConfig) -> dict:
  """The trainable heads -> `ClsNetwork` names (`shared_decoder.*`, `feature_pyramid.*`, ...)."""
  out: dict[str, np.ndarray] = {}
  refiner = params['shared_decoder']
  out['shared_decoder.proj.0.weight'] = conv_oihw(refiner['input_conv']['kernel'])
  _norm(refiner['input_norm'], 'shared_decoder.proj.1', out)
  for index in range(config.refiner_blocks):
    name = f'shared_decoder.blocks.{index}'
    # nn.Sequential(conv, GN, SiLU, Dropout2d, conv, GN): parameter indices 0, 1, 4, 5.
    out[f'{name}.0.weight'] = conv_oihw(refiner[f'block{index}_conv1']['kernel'])
    _norm(refiner[f'block{index}_norm1'], f'{name}.1', out)
    out[f'{name}.4.weight'] = conv_oihw(refiner[f'block{index}_conv2']['kernel'])
    _norm(refiner[f'block{index}_norm2'], f'{name}.5', out)
    skip = refiner[f'block{index}_skip']
    out[f'shared_decoder.skips.{index}.weight'] = conv_oihw(skip['kernel'])
    out[f'shared_decoder.skips.{index}.bias'] = np.asarray(skip['bias'], np.float32)
  out['shared_decoder.final.0.weight'] = conv_oihw(refiner['output_conv']['kernel'])
  _norm(refiner['output_norm'], 'shared_decoder.final.1', out)
  for level in range(len(config.pyramid_channels)):
    # nn.Sequential(conv1x1, GN, SiLU, conv3x3, GN, SiLU): parameter indices 0, 1, 3, 4.
    pyramid, name = params[f'feature_pyramid_{level}'], f'feature_pyramid.projections.{level}'
    out[f'{name}.0.weight'] = conv_oihw(pyramid['conv1']['kernel'])
    _norm(pyramid['norm1'], f'{name}.1', out)
    out[f'{name}.3.weight'] = conv_oihw(pyramid['conv2']['kernel'])
    _norm(pyramid['norm2'], f'{name}.4', out)
    _linear(params[f'proto_projections_{level}'], f'proto_projections.{level}', out)
    out[f'logit_scale{level + 1}'] = np.asarray(params[f'logit_scale{level + 1}'], np.float32).reshape(())
  _linear(params['text_proj'], 'text_proj', out)
  out['learnable_image_prototypes'] = np.asarray(params['learnable_image_prototypes'], np.float32)
  out['clip_adapter.prompt_learner.ctx'] = np.asarray(params['prompt_learner']['ctx'], np.float32)
  feature_dim, vit_width = config.feature_dim, config.vit.width
  out['global_img_proj.weight'] = np.eye(feature_dim, dtype=np.float32)
  out['contrastive_temperature'] = np.asarray(CONTRASTIVE_TEMPERATURE_INIT, np.float32)
  out['clip_adapter.visual_proj.weight'] = np.eye(VISUAL_PROJECTION_DIM, vit_width, dtype=np.float32)
  out['clip_adapter.visual_proj.bias'] = np.zeros(VISUAL_PROJECTION_DIM, np.float32)
  return out


def to_reference_state_dict(params: Mapping, config: DualProtoSegConfig,
                            original: Mapping[str, np.ndarray] | None = None) -> dict:
  """Full `ClsNetwork` state dict; `original` = the CONCH checkpoint the towers came from (or None)."""
  original = original or {}
  final_norm = None
  if 'visual.trunk.norm.weight' in original:
    final_norm = {'weight': original['visual.trunk.norm.weight'], 'bias': original['visual.trunk.norm.bias']}
  towers = {f'visual.trunk.{k}': v for k, v in trunk_to_timm(params['trunk'], config.vit, final_norm).items()}
  towers.update({f'text.{k}': v for k, v in text_to_open_clip(
      params['text_encoder'], config.text, params['prompt_learner']['ctx']).items()})
  for key, value in original.items():  # CoCa parts the Flax model does not hold
    towers.setdefault(key, np.asarray(value))
  out = heads_to_reference(params, config)
  out.update({f'clip_adapter.model.{k}': v for k, v in towers.items()})
  return out


def export(config: ml_collections.ConfigDict, params: Mapping, out_dir: str) -> dict[str, str]:
  """Writes the two safetensors files and the JSON; returns their paths."""
  from safetensors.numpy import save_file

  from protoseg_jax import builders
  from protoseg_jax.convert import torch_files

  model_config = builders.model_config(config)
  original = None
  if config.backbone.source == 'conch':
    original = torch_files.load_state_dict(config.backbone.path, config.backbone.get('checkpoint_key', ''))
  os.makedirs(out_dir, exist_ok=True)
  paths = {'model': os.path.join(out_dir, 'dualprotoseg.safetensors'),
           'trunk': os.path.join(out_dir, 'trunk_timm.safetensors'),
           'config': os.path.join(out_dir, 'export_config.json')}
  full = to_reference_state_dict(params, model_config, original)
  trunk = {key[len('clip_adapter.model.visual.trunk.'):]: value for key, value in full.items()
           if key.startswith('clip_adapter.model.visual.trunk.')}
  trunk = {key: value for key, value in trunk.items() if not key.startswith(('head.', 'fc_norm.'))}
  for kind in ('model', 'trunk'):
    temporary = paths[kind] + '.tmp'
    save_file(full if kind == 'model' else trunk, temporary)
    os.replace(temporary, paths[kind])  # never a half-written file under the final name
  with open(paths['config'], 'w') as handle:
    json.dump({'config': json.loads(config.to_json_best_effort()),
               'layouts': {'conv': 'OIHW', 'linear': '[out, in]'},
               'timm_trunk': {'patch_size': model_config.vit.patch_size, 'embed_dim': model_config.vit.width,
                              'depth': model_config.vit.depth, 'num_heads': model_config.vit.num_heads,
                              'img_size': model_config.vit.patch_size * model_config.vit.pos_embed_grid,
                              'class_token': model_config.vit.class_token,
                              'pre_norm': model_config.vit.pre_norm,
                              'init_values': model_config.vit.layer_scale_init,
                              'num_classes': 0, 'global_pool': 'token'}}, handle, indent=2)
  return paths
