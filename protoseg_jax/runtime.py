"""Shared set-up of the entry points: model, tokenizer, prompt ids, and parameters from a config."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from protoseg_jax import builders, checkpoints, tokenizer as tokenizer_lib
from protoseg_jax.convert import pretrained
from protoseg_jax.models.dualprotoseg import DualProtoSeg


def model_and_prompts(config: ml_collections.ConfigDict):
  """-> (model, tokenizer, prompt token ids `[C*M, L]`)."""
  if config.method != 'dualprotoseg':
    raise ValueError(f"config.method={config.method!r}: only 'dualprotoseg' is implemented")
  model = builders.build_model(config)
  tokenizer_config = config.tokenizer
  if tokenizer_config.kind == 'json' and not tokenizer_config.path and config.backbone.source == 'hf_clip':
    # A CLIPModel folder carries its fast tokenizer: use it unless another file is named.
    folder_tokenizer = os.path.join(config.backbone.path, 'tokenizer.json')
    tokenizer_config = ml_collections.ConfigDict({**tokenizer_config.to_dict(), 'path': folder_tokenizer})
  tokenizer = tokenizer_lib.build_tokenizer(tokenizer_config)
  builders.check_tokenizer_fits(config, tokenizer)
  return model, tokenizer, builders.prompt_token_ids(config, tokenizer)


def initial_params(config: ml_collections.ConfigDict, model: DualProtoSeg, tokenizer,
                   prompt_ids: np.ndarray, rng: jax.Array) -> dict:
  """Random heads + frozen towers from `config.backbone` ('none' = random towers drawn from the seed).

  Imported towers replace the random ones before the prompt context is drawn from the token table, so
  the context starts from the pretrained embeddings of `config.prompts.context_init`.
  """
  # Files first: a bad path or checkpoint fails before any compilation.
  towers = pretrained.load_towers(config.backbone, model.config.vit, model.config.text)
  params = builders.init_params(config, model, prompt_ids, tokenizer, rng)
  if not towers:
    return params
  for name, tower in towers.items():
    _check_same_structure(name, params[name], tower)
    params[name] = jax.tree.map(jnp.asarray, pretrained.as_float32(tower))
  return builders.set_prompt_context(config, model, params, tokenizer)


def _check_same_structure(name: str, expected: dict, loaded: dict) -> None:
  """The converters build exactly the module's tree; this guards the two against drifting apart."""
  shapes = lambda tree: {jax.tree_util.keystr(path): np.shape(leaf)
                         for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, got = shapes(expected), shapes(loaded)
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise ValueError(f'imported {name}: parameter {key} is {got.get(key)} in the checkpoint, '
                       f'{want.get(key)} in the model (config.backbone)')


def frozen_fingerprint(params: dict) -> float:
  """A cheap checksum of the frozen towers, stored with checkpoints to catch a different backbone."""
  _, frozen = builders.split_params(params)
  return checkpoints.tree_checksum(frozen)
