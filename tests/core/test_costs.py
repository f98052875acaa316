"""Compiled-program accounting against hand counts: XLA's FLOPs, the jaxpr's matmul FLOPs, memory, MFU.

Hand counts are 2 x MACs of each matrix product. XLA's `flops` also counts one FLOP per element of every
elementwise op (bias adds, ReLU's compare + select, the loss), so where a function has any, its sizes make
the matmuls dominate (wide layers, small batch of elementwise work): XLA's count must then be within 5 % of
the hand count; the jaxpr count, which holds matmuls only, must equal it.
"""

import math
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax import costs

S = jax.ShapeDtypeStruct
NHWC = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, k, strides=(1, 1), padding='SAME'):
  return jax.lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC)


def _valid_macs_by_arithmetic(conv_fn, x_shape, k_shape) -> float:
  """MACs that touch real input, counted by running the conv on ones: every output element of
  conv(1, 1) is its number of (tap, input channel) products, so their sum over the output is the MACs."""
  out = conv_fn(jnp.ones(x_shape, jnp.float32), jnp.ones(k_shape, jnp.float32))
  return float(np.asarray(out, np.float64).sum())


def test_matmul_chain_xla_and_jaxpr_equal_hand_count():
  a, w1, w2 = S((64, 128), jnp.float32), S((128, 256), jnp.float32), S((256, 32), jnp.float32)
  chain = lambda a, w1, w2: (a @ w1) @ w2
  hand = 2 * 64 * 128 * 256 + 2 * 64 * 256 * 32
  assert costs.matmul_flops(chain, a, w1, w2).flops == hand
  assert costs.compiled_cost(chain, a, w1, w2).flops == pytest.approx(hand, rel=0.05)


def test_conv_counts_only_taps_on_real_input():
  x, k = (4, 14, 14, 32), (3, 3, 32, 16)
  # Per spatial axis, 14 outputs x 3 taps minus the 2 that fall on the SAME padding: 40 pairs.
  hand = 2 * 4 * 40 * 40 * 32 * 16
  dense = 2 * 4 * 14 * 14 * 9 * 32 * 16
  args = (S(x, jnp.float32), S(k, jnp.float32))
  assert 2 * _valid_macs_by_arithmetic(_conv, x, k) == hand
  assert costs.matmul_flops(_conv, *args).conv_flops == hand
  assert costs.compiled_cost(_conv, *args).flops == pytest.approx(hand, rel=0.05)
  assert hand < 0.95 * dense   # the difference is real: padding taps are not MACs


def test_strided_padded_conv_and_its_gradient():
  x, k = (2, 15, 13, 8), (3, 4, 8, 6)
  conv = lambda x, k: _conv(x, k, (2, 3), ((1, 2), (0, 3)))
  forward = 2 * _valid_macs_by_arithmetic(conv, x, k)
  args = (S(x, jnp.float32), S(k, jnp.float32))
  assert costs.matmul_flops(conv, *args).flops == forward
  # Gradient w.r.t. input and kernel of a linear function: two convs of the forward's MACs each, and the
  # (unused) primal forward is dead code for both counts.
  grad = jax.grad(lambda x, k: jnp.sum(conv(x, k)), argnums=(0, 1))
  assert costs.matmul_flops(grad, *args).flops == 2 * forward
  assert costs.compiled_cost(grad, *args).flops == pytest.approx(2 * forward, rel=0.05)
  assert costs.matmul_flops(grad, *args, dce=False).flops == 3 * forward


def test_scan_of_matmuls_xla_counts_the_loop_body_once():
  a, w = S((64, 128), jnp.float32), S((128, 128), jnp.float32)
  one = 2 * 64 * 128 * 128

  def scanned(unroll):
    return lambda a, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), a, None, length=10,
                                     unroll=unroll)[0]

  for unroll in (1, 10):
    assert costs.matmul_flops(scanned(unroll), a, w).flops == 10 * one
  looped = costs.compiled_cost(scanned(1), a, w)
  assert looped.while_loops == 1 and looped.flops == pytest.approx(one, rel=0.05)   # not 10x
  unrolled = costs.compiled_cost(scanned(10), a, w)
  assert unrolled.while_loops == 0 and unrolled.flops == pytest.approx(10 * one, rel=0.05)
  assert unrolled.transcendentals == 10 * 64 * 128   # tanh is not in `flops`


def test_while_loop_trip_counts():
  a, w = S((32, 64), jnp.float32), S((64, 64), jnp.float32)
  one = 2 * 32 * 64 * 64
  static = lambda a, w: jax.lax.while_loop(lambda c: c[0] < 7, lambda c: (c[0] + 1, c[1] @ w), (0, a))[1]
  count = costs.matmul_flops(static, a, w)
  assert count.flops == 7 * one and count.unknown_trip_loops == 0
  dynamic = lambda a, w: jax.lax.while_loop(lambda c: jnp.sum(c[1]) < 1.0, lambda c: (c[0], c[1] @ w),
                                            (0, a))[1]
  count = costs.matmul_flops(dynamic, a, w)
  assert count.flops == one and count.unknown_trip_loops == 1


@pytest.mark.parametrize('argnums', [0, (0, 1)])
def test_value_and_grad_of_two_layer_mlp(argnums):
  batch, width_in, hidden, width_out = 128, 256, 256, 128

  def loss(params, x, target):
    h = jax.nn.relu(x @ params['w1'] + params['b1'])
    return 0.5 * jnp.sum((h @ params['w2'] - target) ** 2)

  params = {'w1': S((width_in, hidden), jnp.float32), 'b1': S((hidden,), jnp.float32),
            'w2': S((hidden, width_out), jnp.float32)}
  args = (params, S((batch, width_in), jnp.float32), S((batch, width_out), jnp.float32))
  layer1, layer2 = 2 * batch * width_in * hidden, 2 * batch * hidden * width_out
  forward = layer1 + layer2
  # Backward: dW2, dh and dW1, each one matmul of its layer's forward size; dx only when x is
  # differentiated too, which makes the backward exactly twice the forward.
  hand = forward + 2 * layer2 + layer1 + (layer1 if argnums == (0, 1) else 0)
  fn = jax.value_and_grad(loss, argnums=argnums)
  assert costs.matmul_flops(fn, *args).flops == hand
  assert costs.compiled_cost(fn, *args).flops == pytest.approx(hand, rel=0.05)


def test_list_matmuls_finds_f32_and_backward_ops_sorted_by_cost():
  def loss(w_bf16, w_f32, x):
    h = jnp.dot(x.astype(jnp.bfloat16), w_bf16, preferred_element_type=jnp.float32)
    y = jnp.dot(h, w_f32, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(y ** 2)

  args = (S((512, 256), jnp.bfloat16), S((256, 8), jnp.float32), S((64, 512), jnp.float32))
  forward = costs.list_matmuls(loss, *args)
  assert [op.flops for op in forward] == [2 * 64 * 512 * 256, 2 * 64 * 256 * 8]
  big, small = forward
  assert (big.lhs_dtype, big.rhs_dtype, big.preferred_element_type, big.f32) == (
      'bfloat16', 'bfloat16', 'float32', False)
  assert small.f32 and 'HIGHEST' in small.precision and small.lhs == (64, 256)
  ops = costs.list_matmuls(jax.grad(loss, argnums=(0, 1)), *args)
  assert [op.flops for op in ops] == sorted((op.flops for op in ops), reverse=True)
  assert sum(op.backward for op in ops) == 3   # dW_f32, dh, dW_bf16 (no dx: x is not differentiated)
  # The bf16 layer's weight gradient is an f32 x bf16 dot: its output asked for f32, so the cotangent
  # arriving there is f32. The lister must flag it (a bf16 program whose backward runs f32 GEMMs).
  (weight_grad,) = [op for op in ops if op.backward and op.rhs_dtype == 'bfloat16']
  assert weight_grad.f32 and weight_grad.lhs_dtype == 'float32' and weight_grad.out == (256, 512)
  count = costs.matmul_flops(jax.grad(loss, argnums=(0, 1)), *args)
  assert count.f32_flops == sum(op.flops for op in ops if op.f32) == (3 * 2 * 64 * 256 * 8
                                                                       + 2 * 64 * 512 * 256)
  assert 'HIGHEST' in costs.format_matmuls(ops)


def test_memory_analysis_holds_a_known_temp_and_the_donation():
  n = 1024

  def squared_outer(v):
    outer = jnp.sin(v[:, None] * v[None, :])      # [N, N] f32, consumed by a matmul: must exist
    return jnp.sum(outer @ outer)

  cost = costs.compiled_cost(squared_outer, S((n,), jnp.float32))
  assert cost.temp_bytes >= n * n * 4
  assert cost.argument_bytes == n * 4 and cost.output_bytes == 4
  assert cost.peak_bytes == cost.argument_bytes + cost.output_bytes + cost.temp_bytes - cost.alias_bytes
  donated = costs.compiled_cost(jax.jit(lambda v: v + 1.0, donate_argnums=0), S((n,), jnp.float32))
  kept = costs.compiled_cost(jax.jit(lambda v: v + 1.0), S((n,), jnp.float32))
  assert donated.alias_bytes == n * 4 and kept.alias_bytes == 0
  assert donated.peak_bytes == kept.peak_bytes - n * 4


def test_compile_only_never_allocates_the_inputs():
  n = 65536   # two 16 GiB operands
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  cost = costs.compiled_cost(lambda a, b: a @ b, S((n, n), jnp.float32), S((n, n), jnp.float32))
  grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
  assert cost.flops == 2.0 * n ** 3 and cost.argument_bytes == 2 * n * n * 4
  assert grown < 2 ** 30


def test_abstract_keeps_shapes_and_dtypes():
  tree = {'a': jnp.zeros((3, 2), jnp.bfloat16), 'b': [np.ones(4, np.int32)], 'c': 1.5}
  out = costs.abstract(tree)
  assert out['a'].shape == (3, 2) and out['a'].dtype == jnp.bfloat16
  assert isinstance(out['b'][0], S) and out['b'][0].dtype == np.int32 and out['c'] == 1.5


def test_cost_dict_accepts_every_cost_analysis_shape():
  class Fake:
    def __init__(self, value):
      self.value = value

    def cost_analysis(self):
      return self.value

  assert costs.cost_dict(Fake({'flops': 3.0})) == {'flops': 3.0}
  assert costs.cost_dict(Fake([{'flops': 3.0, 'bytes accessed': 1.0}, {'flops': 4.0}])) == {
      'flops': 7.0, 'bytes accessed': 1.0}
  assert costs.cost_dict(Fake(None)) == {}


@pytest.mark.parametrize('kind, key, tflops', [
    ('NVIDIA H100 80GB HBM3', 'h100_sxm', 989.4), ('NVIDIA H100 PCIe', 'h100_pcie', 756.0),
    ('NVIDIA H100 NVL', 'h100_nvl', 835.0), ('NVIDIA H200', 'h200', 989.4),
    ('NVIDIA A100-SXM4-80GB', 'a100', 312.0), ('NVIDIA A100 80GB PCIe', 'a100', 312.0),
    ('TPU v4', 'tpu_v4', 275.0), ('TPU v5 lite', 'tpu_v5e', 197.0), ('TPU v5e', 'tpu_v5e', 197.0),
    ('TPU v5', 'tpu_v5p', 459.0), ('TPU v5p', 'tpu_v5p', 459.0), ('TPU v6 lite', 'tpu_v6e', 918.0)])
def test_peak_lookup_by_device_kind(kind, key, tflops):
  peak = costs.peak_tflops(kind)
  assert (peak.key, peak.tflops) == (key, tflops) and peak.source


def test_mfu_arithmetic_override_and_unknown_devices():
  peak = costs.peak_tflops('NVIDIA H200')
  # 1,978.8 TFLOP in 4 s on a 989.4 TFLOP/s chip: half the peak.
  assert costs.mfu(1978.8e12, 4.0, peak) == pytest.approx(0.5)
  assert costs.mfu(1978.8e12, 4.0, costs.peak_tflops('NVIDIA H200', override=790.0)) == pytest.approx(
      1978.8 / 4.0 / 790.0)
  assert costs.peak_tflops(key='h200_workplace').tflops == 790.0
  for kind in ('cpu', 'TPU v4 lite', 'Some New Chip'):
    peak = costs.peak_tflops(kind)
    assert peak.key == 'unknown' and math.isnan(costs.mfu(1e12, 1.0, peak))
  assert math.isnan(costs.mfu(1e12, 0.0, 100.0))
  assert costs.peak_tflops('cpu', override=1.0).tflops == 1.0
