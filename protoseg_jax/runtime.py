"""Shared set-up of the entry points: model, tokenizer, prompt ids, and parameters from a config."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from protoseg_jax import builders, tokenizer as tokenizer_lib
from protoseg_jax.models.dualprotoseg import DualProtoSeg


def model_and_prompts(config: ml_collections.ConfigDict):
  """-> (model, tokenizer, prompt token ids `[C*M, L]`)."""
  if config.method != 'dualprotoseg':
    raise ValueError(f"config.method={config.method!r}: only 'dualprotoseg' is implemented")
  model = builders.build_model(config)
  tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
  builders.check_tokenizer_fits(config, tokenizer)
  return model, tokenizer, builders.prompt_token_ids(config, tokenizer)


def initial_params(config: ml_collections.ConfigDict, model: DualProtoSeg, tokenizer,
                   prompt_ids: np.ndarray, rng: jax.Array) -> dict:
  """Random heads + frozen towers from `config.backbone` ('none' = random towers drawn from the seed)."""
  if config.backbone.source != 'none':
    raise NotImplementedError(
        f'config.backbone.source={config.backbone.source!r}: importing pretrained towers (CONCH, '
        "HF CLIP, timm) is not implemented yet; use 'none' (random frozen towers)")
  return builders.init_params(config, model, prompt_ids, tokenizer, rng)


def frozen_fingerprint(params: dict) -> float:
  """A cheap checksum of the frozen towers, stored with checkpoints to catch a different backbone."""
  _, frozen = builders.split_params(params)
  return float(sum(np.abs(np.asarray(leaf, np.float64)).sum() for leaf in jax.tree.leaves(frozen)))
