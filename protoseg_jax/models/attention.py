"""The one multi-head self-attention block of the shared towers (ViT trunk and text tower).

Fused q|k|v projection, `jax.nn.dot_product_attention` (softmax in f32), output projection. The parameter
names are the checkpoints' (timm: `qkv` / `proj`; open_clip: `in_proj` / `out_proj`), given by the caller.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from protoseg_jax import sharding

Dtype = Any


class SelfAttention(nn.Module):
  """`[N, L, D]` -> `[N, L, D]` in `dtype`.

  `tokens_axis`: the logical name of the N axis for activation sharding ('batch' for images, 'prompts'
  for the text tower's prompts).
  """

  width: int
  num_heads: int
  qkv_bias: bool
  dtype: Dtype
  qkv_name: str = 'qkv'
  out_name: str = 'proj'
  tokens_axis: Optional[str] = 'batch'

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool = False) -> jax.Array:
    count, tokens, _ = x.shape
    head_dim = self.width // self.num_heads
    qkv = nn.Dense(3 * self.width, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=jnp.float32,
                   name=self.qkv_name)(x)
    qkv = qkv.reshape(count, tokens, 3, self.num_heads, head_dim)
    qkv = sharding.with_logical_constraint(qkv, (self.tokens_axis, 'length', None, 'act_heads', None))
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=causal)
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32,
                    name=self.out_name)(out.reshape(count, tokens, self.width))
