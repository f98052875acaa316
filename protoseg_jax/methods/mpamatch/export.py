"""Trained MPAMatch weights -> PyTorch-loadable safetensors.

  python -m protoseg_jax.main --config=configs/glas_semi.py --workdir=DIR --mode=export
      [--checkpoint=best|last|STEP] [--out=DIR]

writes, under `<out>` (default `DIR/export`, replaced atomically by the core):
  - `mpamatch.safetensors`: the whole segmenter with TransUNet's PyTorch names for the decoder
    (`decoder.conv_more.{0,1}`, `decoder.blocks.<i>.conv{1,2}.{0,1}`, `segmentation_head.0`: each
    `Conv2dReLU` is `Sequential(conv, BatchNorm2d, ReLU)`), the UNI trunk under `encoder.` with timm names,
    the embedding head as `Sequential(conv, BN, ReLU, conv)` under `embed_head.`, the text tower under
    `text_encoder.` (open_clip / CONCH names), `prompt_learner.ctx` and `text_adapter` (a `Linear`);
  - `encoder_timm.safetensors`: the fine-tuned UNI trunk alone, for `timm.create_model(
    'vit_large_patch16_224', init_values=1e-5, num_classes=0, dynamic_img_size=True)`;
  - `export_config.json`: the config and the layout conventions.
BatchNorm running statistics come from the checkpoint; layouts are torch's (conv OIHW, linear [out, in]).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import ml_collections
import numpy as np

from protoseg_jax.convert import to_torch
from protoseg_jax.methods.mpamatch.model import SegmenterConfig


def _conv_bn(params: Mapping, stats: Mapping, prefix: str, out: dict) -> None:
  """`ConvBnRelu` -> `<prefix>.0.weight` (conv, no bias) and `<prefix>.1.*` (BatchNorm2d with buffers)."""
  out[f'{prefix}.0.weight'] = to_torch.conv_oihw(params['conv']['kernel'])
  bn, running = params['bn'], stats['bn']
  out[f'{prefix}.1.weight'] = np.asarray(bn['scale'], np.float32)
  out[f'{prefix}.1.bias'] = np.asarray(bn['bias'], np.float32)
  out[f'{prefix}.1.running_mean'] = np.asarray(running['mean'], np.float32)
  out[f'{prefix}.1.running_var'] = np.asarray(running['var'], np.float32)
  out[f'{prefix}.1.num_batches_tracked'] = np.zeros((), np.int64)


def to_torch_state_dict(params: Mapping, batch_stats: Mapping, config: SegmenterConfig) -> dict:
  """Flax params (trainable + frozen) and BatchNorm statistics -> the names in the module docstring."""
  oihw = to_torch.conv_oihw
  encoder_norm = {'weight': params['encoder_norm']['scale'], 'bias': params['encoder_norm']['bias']}
  out = {f'encoder.{key}': value
         for key, value in to_torch.trunk_to_timm(params['encoder'], config.vit, encoder_norm).items()}
  decoder, decoder_stats = params['decoder'], batch_stats['decoder']
  _conv_bn(decoder['conv_more'], decoder_stats['conv_more'], 'decoder.conv_more', out)
  for index in range(len(config.decoder_channels)):
    for conv in ('conv1', 'conv2'):
      name = f'block{index}_{conv}'
      _conv_bn(decoder[name], decoder_stats[name], f'decoder.blocks.{index}.{conv}', out)
  out['segmentation_head.0.weight'] = oihw(params['seg_head']['kernel'])
  out['segmentation_head.0.bias'] = np.asarray(params['seg_head']['bias'], np.float32)
  embed, embed_stats = params['embed_head'], batch_stats['embed_head']
  _conv_bn(embed['proj1'], embed_stats['proj1'], 'embed_head', out)   # -> embed_head.0 (conv), .1 (BN)
  out['embed_head.3.weight'] = oihw(embed['proj2']['kernel'])         # .2 is the ReLU
  out['embed_head.3.bias'] = np.asarray(embed['proj2']['bias'], np.float32)
  out.update({f'text_encoder.{key}': value
              for key, value in to_torch.text_to_open_clip(params['text_encoder'], config.text).items()})
  out['prompt_learner.ctx'] = np.asarray(params['prompt_learner']['ctx'], np.float32)
  adapter = np.asarray(params['text_adapter']['kernel'], np.float32)
  out['text_adapter.weight'] = np.ascontiguousarray(adapter.T)
  out['text_adapter.bias'] = np.asarray(params['text_adapter']['bias'], np.float32)
  return out


def export(config: ml_collections.ConfigDict, params: Mapping, batch_stats: Mapping,
           segmenter: SegmenterConfig, out_dir: str) -> dict[str, str]:
  """Writes the three files of the module docstring; returns {'model', 'trunk', 'config'} -> path."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  state = to_torch_state_dict(params, batch_stats, segmenter)
  paths = {'model': os.path.join(out_dir, 'mpamatch.safetensors'),
           'trunk': os.path.join(out_dir, 'encoder_timm.safetensors'),
           'config': os.path.join(out_dir, 'export_config.json')}
  save_file({key: np.ascontiguousarray(value) for key, value in state.items()}, paths['model'])
  save_file({key[len('encoder.'):]: np.ascontiguousarray(value) for key, value in state.items()
             if key.startswith('encoder.')}, paths['trunk'])
  with open(paths['config'], 'w') as handle:
    json.dump({'config': json.loads(config.to_json_best_effort()),
               'layouts': {'conv': 'OIHW', 'linear': '[out, in]'},
               'decoder': 'TransUNet DecoderCup names, Conv2dReLU = Sequential(conv, BatchNorm2d, ReLU)',
               'class_names': list(config.data.class_names)}, handle, indent=2)
  return paths
