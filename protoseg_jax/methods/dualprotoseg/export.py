"""Trained DualProtoSeg parameters -> PyTorch safetensors named as the authors' `ClsNetwork`, plus the trunk
alone as a timm `VisionTransformer` state dict.

  python -m protoseg_jax.main --config=configs/bcss.py --workdir=DIR --mode=export \
      [--checkpoint=best|last|STEP]

writes, under `--out` (default `DIR/export`, replaced atomically): `dualprotoseg.safetensors` (the full
network), `trunk_timm.safetensors` (timm ViT) and `export_config.json` (the config, the channel order the
model expects, the tensor-name conventions). Layouts: conv kernels OIHW, linear weights `[out, in]`.

What loads strictly where:
  - `dualprotoseg.safetensors` loads with `load_state_dict(strict=True)` into the authors' `ClsNetwork` built
    on CONCH (`src/model.py` + `src/conch_adapter.py`, the same sizes as the config): every parameter and
    buffer it registers is written, including
      * `clip_adapter.prompt_learner.model_conch.*`: the reference's prompt learner registers the CONCH model
        a second time; the same tensors as `clip_adapter.model.*`;
      * the buffers `prototypes` `[C·M, 512]` and `class_prototypes` `[C, 512]`: the L2-normalised text
        features of the C·M prompts (and the normalised per-class mean of them) that the reference computes
        once at construction, with the initial prompt context, and never reads again — written from this
        config's initial context;
      * the CoCa parts outside the two towers (attentional poolers, caption decoder, ...), the trunk's final
        `norm` and the text `cls_emb`, copied from the original CONCH checkpoint (`config.backbone.path`)
        when the towers came from one (with random towers the file holds the towers DualProtoSeg uses, and
        the timm `norm` as the identity: then only the towers' and heads' keys exist);
      * the C·n_ctx context rows the reference appends to the text token table, equal to
        `prompt_learner.ctx`; `global_img_proj.weight` (identity), `contrastive_temperature` (0.1) and
        `clip_adapter.visual_proj` (identity, zero bias): the unused contrastive branch at its initial values.
  - `trunk_timm.safetensors` loads strictly into `timm.create_model('vit_base_patch16_224', num_classes=0,
    img_size=<patch · pos_embed_grid>, dynamic_img_size=True)` (sizes in `export_config.json`).
The model expects tiles in `config.data.channel_order` (BGR for the published setting, as the reference
reads them with OpenCV); `export_config.json` records it.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import ml_collections
import numpy as np

from protoseg_jax.convert import to_torch
from protoseg_jax.methods.dualprotoseg.model import DualProtoSegConfig

CONTRASTIVE_TEMPERATURE_INIT = 0.1   # the reference ClsNetwork's initial value (unused branch)
VISUAL_PROJECTION_DIM = 512          # the reference ConchAdapter.visual_proj output width (unused)
MODEL_PREFIX = 'clip_adapter.model.'
ALIAS_PREFIX = 'clip_adapter.prompt_learner.model_conch.'


def heads_to_reference(params: Mapping, config: DualProtoSegConfig) -> dict:
  """The trainable heads -> `ClsNetwork` names (`shared_decoder.*`, `feature_pyramid.*`, ...)."""
  out: dict[str, np.ndarray] = {}
  refiner = params['shared_decoder']
  out['shared_decoder.proj.0.weight'] = to_torch.conv_oihw(refiner['input_conv']['kernel'])
  to_torch.norm(refiner['input_norm'], 'shared_decoder.proj.1', out)
  for index in range(config.refiner_blocks):
    name = f'shared_decoder.blocks.{index}'
    # nn.Sequential(conv, GN, SiLU, Dropout2d, conv, GN): parameter indices 0, 1, 4, 5.
    out[f'{name}.0.weight'] = to_torch.conv_oihw(refiner[f'block{index}_conv1']['kernel'])
    to_torch.norm(refiner[f'block{index}_norm1'], f'{name}.1', out)
    out[f'{name}.4.weight'] = to_torch.conv_oihw(refiner[f'block{index}_conv2']['kernel'])
    to_torch.norm(refiner[f'block{index}_norm2'], f'{name}.5', out)
    skip = refiner[f'block{index}_skip']
    out[f'shared_decoder.skips.{index}.weight'] = to_torch.conv_oihw(skip['kernel'])
    out[f'shared_decoder.skips.{index}.bias'] = np.asarray(skip['bias'], np.float32)
  out['shared_decoder.final.0.weight'] = to_torch.conv_oihw(refiner['output_conv']['kernel'])
  to_torch.norm(refiner['output_norm'], 'shared_decoder.final.1', out)
  for level in range(len(config.pyramid_channels)):
    # nn.Sequential(conv1x1, GN, SiLU, conv3x3, GN, SiLU): parameter indices 0, 1, 3, 4.
    pyramid, name = params[f'feature_pyramid_{level}'], f'feature_pyramid.projections.{level}'
    out[f'{name}.0.weight'] = to_torch.conv_oihw(pyramid['conv1']['kernel'])
    to_torch.norm(pyramid['norm1'], f'{name}.1', out)
    out[f'{name}.3.weight'] = to_torch.conv_oihw(pyramid['conv2']['kernel'])
    to_torch.norm(pyramid['norm2'], f'{name}.4', out)
    to_torch.linear(params[f'proto_projections_{level}'], f'proto_projections.{level}', out)
    out[f'logit_scale{level + 1}'] = np.asarray(params[f'logit_scale{level + 1}'], np.float32).reshape(())
  to_torch.linear(params['text_proj'], 'text_proj', out)
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
  trunk = to_torch.trunk_to_timm(params['trunk'], config.vit, final_norm)
  towers = {f'visual.trunk.{k}': v for k, v in trunk.items()}
  towers.update({f'text.{k}': v for k, v in to_torch.text_to_open_clip(
      params['text_encoder'], config.text, params['prompt_learner']['ctx']).items()})
  for key, value in original.items():  # CoCa parts the Flax model does not hold
    towers.setdefault(key, np.asarray(value))
  out = heads_to_reference(params, config)
  out.update({f'clip_adapter.model.{k}': v for k, v in towers.items()})
  return out


def with_reference_aliases(state: dict, initial_text_features: np.ndarray, num_classes: int) -> dict:
  """Adds what the reference registers besides the parameters: the `model_conch` alias of every CONCH
  tensor and the construction-time text-prototype buffers (see the module docstring).

  `initial_text_features` `[C·M, E]`: text features of the prompts with the initial context.
  """
  out = dict(state)
  for key, value in state.items():
    if key.startswith(MODEL_PREFIX):
      out[ALIAS_PREFIX + key[len(MODEL_PREFIX):]] = value
  features = np.asarray(initial_text_features, np.float32)
  features = features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  per_class = features.reshape(num_classes, -1, features.shape[-1]).mean(axis=1)
  out['prototypes'] = features
  out['class_prototypes'] = per_class / np.maximum(np.linalg.norm(per_class, axis=-1, keepdims=True), 1e-12)
  return out


def write(config: ml_collections.ConfigDict, model_config: DualProtoSegConfig, params: Mapping,
          initial_text_features: np.ndarray, out_dir: str, original: Mapping | None = None) -> dict[str, str]:
  """Writes the two safetensors files and the JSON into `out_dir`; returns their paths."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  paths = {'model': os.path.join(out_dir, 'dualprotoseg.safetensors'),
           'trunk': os.path.join(out_dir, 'trunk_timm.safetensors'),
           'config': os.path.join(out_dir, 'export_config.json')}
  full = with_reference_aliases(to_reference_state_dict(params, model_config, original),
                                initial_text_features, model_config.num_classes)
  trunk_prefix = MODEL_PREFIX + 'visual.trunk.'
  trunk = {key[len(trunk_prefix):]: value for key, value in full.items() if key.startswith(trunk_prefix)}
  trunk = {key: value for key, value in trunk.items() if not key.startswith(('head.', 'fc_norm.'))}
  save_file({k: np.ascontiguousarray(v) for k, v in full.items()}, paths['model'])
  save_file({k: np.ascontiguousarray(v) for k, v in trunk.items()}, paths['trunk'])
  vit = model_config.vit
  with open(paths['config'], 'w') as handle:
    json.dump({'config': json.loads(config.to_json_best_effort()),
               'channel_order': config.data.get('channel_order', 'rgb'),
               'normalisation': {'mean': list(config.data.mean), 'std': list(config.data.std),
                                 'applied_to': 'pixel / 255 in channel_order'},
               'layouts': {'conv': 'OIHW', 'linear': '[out, in]'},
               'timm_trunk': {'patch_size': vit.patch_size, 'embed_dim': vit.width, 'depth': vit.depth,
                              'num_heads': vit.num_heads, 'img_size': vit.patch_size * vit.pos_embed_grid,
                              'class_token': vit.class_token, 'pre_norm': vit.pre_norm,
                              'init_values': vit.layer_scale_init, 'dynamic_img_size': True,
                              'num_classes': 0, 'global_pool': 'token'}}, handle, indent=2)
  return paths
