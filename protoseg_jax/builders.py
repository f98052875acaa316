"""From a config to a model, its prompt token ids and its initial parameters."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from protoseg_jax.models import text as text_lib
from protoseg_jax.models.dualprotoseg import FROZEN_COLLECTIONS, DualProtoSeg, DualProtoSegConfig
from protoseg_jax.models.text import TextConfig
from protoseg_jax.models.vit import VitConfig


def _dataclass_from_config(cls, config: ml_collections.ConfigDict, where: str, **extra):
  """Builds `cls` from a ConfigDict, naming any key the dataclass does not have."""
  fields = {field.name for field in dataclasses.fields(cls)}
  values = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f'unknown config key(s) {", ".join(where + "." + key for key in unknown)}; '
                     f'known: {", ".join(sorted(fields))}')
  for key, value in values.items():
    if isinstance(value, list):
      values[key] = tuple(value)
  return cls(**values, **extra)


def model_config(config: ml_collections.ConfigDict) -> DualProtoSegConfig:
  model = config.model
  vit = _dataclass_from_config(VitConfig, model.vit, 'config.model.vit')
  text = _dataclass_from_config(TextConfig, model.text, 'config.model.text')
  rest = {key: value for key, value in model.items() if key not in ('vit', 'text')}
  num_classes = len(config.data.class_names)
  phrases = config.prompts.phrases
  if len(phrases) != num_classes or any(len(p) != model.prompts_per_class for p in phrases):
    raise ValueError(f'config.prompts.phrases must hold {num_classes} classes x '
                     f'{model.prompts_per_class} phrases (config.model.prompts_per_class), got '
                     f'{[len(p) for p in phrases]}')
  return _dataclass_from_config(DualProtoSegConfig, rest, 'config.model', vit=vit, text=text,
                                num_classes=num_classes)


def compute_dtype(name: str):
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  if name in ('float32', 'bfloat16', 'float16'):
    return jnp.dtype(name)
  raise ValueError(f"config.train.compute_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")


def build_model(config: ml_collections.ConfigDict) -> DualProtoSeg:
  return DualProtoSeg(model_config(config), compute_dtype(config.train.compute_dtype))


def prompt_token_ids(config: ml_collections.ConfigDict, tokenizer) -> np.ndarray:
  """`[C*M, L]` int32 prompt ids, class-major, with `n_ctx` placeholder slots after BOS."""
  phrases = [phrase for class_phrases in config.prompts.phrases for phrase in class_phrases]
  return text_lib.build_prompt_token_ids([tokenizer.encode(phrase) for phrase in phrases],
                                         config.model.n_ctx, tokenizer.bos_id, tokenizer.eos_id,
                                         config.model.text.context_length)


def check_tokenizer_fits(config: ml_collections.ConfigDict, tokenizer) -> None:
  vocab = getattr(tokenizer, 'vocab_size', None)
  if vocab is not None and vocab > config.model.text.vocab_size:
    raise ValueError(f'the tokenizer has {vocab} ids but config.model.text.vocab_size is '
                     f'{config.model.text.vocab_size}')


def split_params(params: dict) -> tuple[dict, dict]:
  """Splits a parameter tree into (trainable, frozen) by top-level module name."""
  frozen = {key: value for key, value in params.items() if key in FROZEN_COLLECTIONS}
  trainable = {key: value for key, value in params.items() if key not in FROZEN_COLLECTIONS}
  return trainable, frozen


def init_params(config: ml_collections.ConfigDict, model: DualProtoSeg, prompt_ids: np.ndarray,
                tokenizer, rng: jax.Array) -> dict:
  """Random initial parameters (jitted init), with the prompt context set as the reference does."""
  size = config.data.image_size
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  params_key, dropout_key = jax.random.split(rng)

  @jax.jit
  def init(params_key, dropout_key):
    return model.init({'params': params_key, 'dropout': dropout_key}, images, jnp.asarray(prompt_ids))

  return set_prompt_context(config, model, init(params_key, dropout_key)['params'], tokenizer)


def set_prompt_context(config: ml_collections.ConfigDict, model: DualProtoSeg, params: dict,
                       tokenizer) -> dict:
  """Sets the prompt context `[C, n_ctx, D]` as the reference does: the token embeddings of
  `config.prompts.context_init` (from the current text tower's table) plus per-class N(0, std) noise."""
  init_ids = [tokenizer.bos_id] + tokenizer.encode(config.prompts.context_init) + [tokenizer.eos_id]
  table = np.asarray(params['text_encoder']['token_embedding']['embedding'])
  context = text_lib.initial_context(table, init_ids, model.config.num_classes, model.config.n_ctx,
                                     config.prompts.context_init_std,
                                     np.random.default_rng(config.seed))
  return {**params, 'prompt_learner': {**params['prompt_learner'], 'ctx': jnp.asarray(context)}}


def parameter_counts(params: dict) -> dict[str, int]:
  trainable, frozen = split_params(params)
  count = lambda tree: int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))
  return {'trainable': count(trainable), 'frozen': count(frozen), 'total': count(params)}
