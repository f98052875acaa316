"""Initialisers and small layers shared by the models.

Freshly built heads start from the same distributions as the reference code's: its refiner and pyramid
convolutions are re-initialised with `kaiming_normal_(mode='fan_out', nonlinearity='relu')` (weights only;
biases keep PyTorch's default U(+-1/sqrt(fan_in))), and `nn.Linear` layers it does not re-initialise keep
PyTorch's default kaiming-uniform(a = sqrt(5)).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)) == variance_scaling(1/3, fan_in, uniform).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (out_channels * kh * kw)), untruncated.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_default_bias_init(fan_in: int):
  """Bias initialiser U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as PyTorch's conv and linear layers."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def gelu_exact(x: jax.Array) -> jax.Array:
  """GELU with the erf form (PyTorch's `nn.GELU()` default)."""
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': gelu_exact, 'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
               'quick_gelu': quick_gelu}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def conv(features: int, kernel_size: int, in_features: int, use_bias: bool, dtype: Dtype,
         name: str) -> nn.Conv:
  """NHWC 'SAME' convolution, `dtype` compute and f32 params; the reference heads' init (module doc)."""
  return nn.Conv(features, (kernel_size, kernel_size), padding='SAME', use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=kaiming_normal_fan_out,
                 bias_init=torch_default_bias_init(in_features * kernel_size * kernel_size), name=name)


def group_norm(num_groups: int, name: str, epsilon: float = 1e-5) -> nn.GroupNorm:
  """GroupNorm computed and returned in f32 (PyTorch's eps 1e-5)."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
  """LayerNorm computed and returned in f32."""
  return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name)
