"""Text transformer (open_clip / CONCH layout) and the CoOp prompt learner.

Parameter names follow open_clip's `TextTransformer` (`token_embedding`, `positional_embedding`,
`resblocks_{i}/{ln_1,attn,ln_2,mlp}`, `ln_final`, `text_projection`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from protoseg_jax import sharding
from protoseg_jax.errors import ConfigError
from protoseg_jax.models import layers
from protoseg_jax.models.attention import SelfAttention

Dtype = Any

# Logical names of the prompt token stream `[N, L, D]` (activation sharding; no-op without a mesh context).
PROMPT_TOKENS = ('prompts', 'length', 'act_embed')


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Sizes of the text tower. Defaults are CONCH's text encoder."""

  vocab_size: int = 32007
  context_table: int = 128     # rows of the position table in the checkpoint
  context_length: int = 77     # prompt length actually used (first rows of the table)
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  embed_dim: int = 512         # output of text_projection
  layer_norm_eps: float = 1e-5
  activation: str = 'gelu'
  causal_mask: bool = False    # reference quirk: the prompt learner runs the tower bidirectionally
  pooling: str = 'last'        # 'last' (reference quirk: position L-1) or 'eos' (argmax token id)


class TextBlock(nn.Module):
  config: TextConfig
  dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    y = layers.layer_norm(cfg.layer_norm_eps, 'ln_1')(x)
    x = x + SelfAttention(cfg.width, cfg.num_heads, True, self.dtype, qkv_name='in_proj', out_name='out_proj',
                          tokens_axis='prompts', name='attn')(y, cfg.causal_mask).astype(jnp.float32)
    y = layers.layer_norm(cfg.layer_norm_eps, 'ln_2')(x)
    y = nn.Dense(int(cfg.width * cfg.mlp_ratio), dtype=self.dtype, param_dtype=jnp.float32,
                 name='c_fc')(y)
    y = layers.activation(cfg.activation)(y)
    y = sharding.with_logical_constraint(y, ('prompts', 'length', 'act_mlp'))
    y = nn.Dense(cfg.width, dtype=self.dtype, param_dtype=jnp.float32, name='c_proj')(y)
    return sharding.with_logical_constraint(x + y.astype(jnp.float32), PROMPT_TOKENS)


class TextTransformer(nn.Module):
  """Token embeddings `[N, L, D]` (+ token ids `[N, L]` for EOS pooling) -> text features `[N, E]` (f32).

  The embeddings are passed in (not ids) so that the prompt learner can splice learnable context vectors
  into them; `embed(ids)` gives the frozen token embeddings.
  """

  config: TextConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.token_embedding = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02),
                                    param_dtype=jnp.float32)
    self.positional_embedding = self.param('positional_embedding', nn.initializers.normal(0.01),
                                           (cfg.context_table, cfg.width))
    self.resblocks = [TextBlock(cfg, self.dtype, name=f'resblocks_{i}') for i in range(cfg.depth)]
    self.ln_final = layers.layer_norm(cfg.layer_norm_eps, 'ln_final')
    self.text_projection = self.param('text_projection', nn.initializers.normal(cfg.width ** -0.5),
                                      (cfg.width, cfg.embed_dim))

  def embed(self, token_ids: jax.Array) -> jax.Array:
    """`[N, L]` int -> `[N, L, D]` f32 token embeddings."""
    return self.token_embedding(token_ids)

  def __call__(self, embeddings: jax.Array, token_ids: jax.Array) -> jax.Array:
    cfg = self.config
    length = embeddings.shape[1]
    if length > cfg.context_table:
      raise ValueError(f'prompt length {length} exceeds the position table ({cfg.context_table})')
    x = embeddings.astype(jnp.float32) + self.positional_embedding[:length]
    x = sharding.with_logical_constraint(x, PROMPT_TOKENS)
    for block in self.resblocks:
      x = block(x)
    x = self.ln_final(x)
    if cfg.pooling == 'last':
      pooled = x[:, -1]
    elif cfg.pooling == 'eos':
      pooled = jnp.take_along_axis(x, jnp.argmax(token_ids, axis=-1)[:, None, None], axis=1)[:, 0]
    else:
      raise ValueError(f"unknown text pooling {cfg.pooling!r}: expected 'last' or 'eos'")
    return jnp.dot(pooled, self.text_projection, precision=jax.lax.Precision.HIGHEST)


def build_prompt_token_ids(phrase_token_ids: Sequence[Sequence[int]], n_ctx: int, bos_id: int,
                           eos_id: int, context_length: int, placeholder_id: int = 0) -> np.ndarray:
  """Token ids `[N, L]` of `[BOS, ctx x n_ctx, phrase..., EOS, 0...]` for each phrase.

  The `n_ctx` context slots hold `placeholder_id`; the prompt learner overwrites their embeddings.
  """
  rows = []
  for index, phrase in enumerate(phrase_token_ids):
    row = [bos_id] + [placeholder_id] * n_ctx + list(phrase) + [eos_id]
    if len(row) > context_length:
      raise ValueError(f'prompt {index} needs {len(row)} tokens, more than the context length '
                       f'{context_length}; shorten the phrase or reduce n_ctx')
    rows.append(row + [0] * (context_length - len(row)))
  return np.asarray(rows, np.int32)


def prompt_token_ids(tokenizer, phrases: Sequence[str], n_ctx: int, context_length: int) -> np.ndarray:
  """`[N, L]` int32 ids of the CoOp prompts of `phrases` (`build_prompt_token_ids` over `tokenizer.encode`):
  class prompts and free query phrases are laid out alike."""
  return build_prompt_token_ids([tokenizer.encode(phrase) for phrase in phrases], n_ctx, tokenizer.bos_id,
                                tokenizer.eos_id, context_length)


def phrase_token_budget(n_ctx: int, context_length: int) -> int:
  """The most ids a phrase may take in a prompt: the context minus BOS, EOS and the context slots."""
  return context_length - 2 - n_ctx


def check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
  """A tokenizer with more ids than the text tower's embedding table (`config.model.text.vocab_size`) is
  refused in one line."""
  vocab = getattr(tokenizer, 'vocab_size', None)
  if vocab is not None and vocab > vocab_size:
    raise ConfigError(f'the tokenizer has {vocab} ids but config.model.text.vocab_size is {vocab_size}')


class PromptLearner(nn.Module):
  """CoOp prompt learner with class-specific context vectors.

  Holds `ctx` `[C, n_ctx, D]` (learnable). Given the prompt token ids `[C*M, L]` (class-major: the M
  phrases of class 0, then class 1, ...) and their frozen embeddings `[C*M, L, D]`, returns the embeddings
  with positions 1..n_ctx replaced by the prompt's class context.
  """

  num_classes: int
  n_ctx: int
  width: int

  @nn.compact
  def __call__(self, token_embeddings: jax.Array) -> jax.Array:
    ctx = self.param('ctx', nn.initializers.normal(0.02), (self.num_classes, self.n_ctx, self.width))
    prompts_per_class = token_embeddings.shape[0] // self.num_classes
    per_prompt_ctx = jnp.repeat(ctx, prompts_per_class, axis=0).astype(token_embeddings.dtype)
    return jnp.concatenate([token_embeddings[:, :1], per_prompt_ctx,
                            token_embeddings[:, 1 + self.n_ctx:]], axis=1)


def initial_context(token_embedding_table: np.ndarray, init_token_ids: Sequence[int], num_classes: int,
                    n_ctx: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
  """Reference context init: embeddings of the init phrase (ids 1..n_ctx of a BOS/EOS tokenisation padded
  by repeating its last id to n_ctx + 2) plus N(0, noise_std) per class. Returns `[C, n_ctx, D]`."""
  ids = list(init_token_ids)
  ids = (ids + [ids[-1]] * (n_ctx + 2))[:max(len(ids), n_ctx + 2)]
  base = np.asarray(token_embedding_table)[np.asarray(ids[1:n_ctx + 1])]
  noise = rng.normal(0.0, noise_std, (num_classes,) + base.shape)
  return (base[None] + noise).astype(np.float32)

