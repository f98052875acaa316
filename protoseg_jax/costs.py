"""Compiled-program accounting: FLOPs, bytes and memory of a jitted function without running it.

Everything here works from shapes: pass arrays or `jax.ShapeDtypeStruct`s (`abstract(tree)` turns a tree of
arrays into the latter), and nothing full-size is executed or allocated. Three views of one program:

* `compiled_cost(fn, *args)`: lowers and compiles `fn` and reads XLA's own `cost_analysis()` (FLOPs,
  transcendentals, bytes accessed) and `memory_analysis()` (argument, output, temp, generated code and
  alias sizes), with the lower and compile times. `ProgramCost.peak_bytes` = argument + output + temp -
  alias (see there).
* `matmul_flops(fn, *args)` / `list_matmuls(fn, *args)`: an independent, analytic count of the matrix
  work in `jax.make_jaxpr(fn)(*args)`: 2 x MACs of every `dot_general` and `conv_general_dilated`, inside
  jit / custom_jvp / custom_vjp / remat bodies, scan bodies times their length and while bodies times a
  trip count read from the loop where it is static, after dropping ops whose results reach no output (as
  XLA would). The list gives each op's name stack (Flax module path; `transpose(...)` marks the backward
  pass), shapes, dtypes, precision and FLOPs, sorted by cost: the tool for "which model part costs what"
  and "f32 matmuls where bf16 was asked for" (note that a bf16 dot whose output asks for f32,
  `preferred_element_type=f32`, gets an f32 cotangent: its backward dots are f32 x bf16).
* `peak_tflops(device_kind)` and `mfu(flops, seconds, peak)`: the bf16 dense peak of the chip, by
  `jax.devices()[0].device_kind`, from the vendors' datasheets (`PEAK_TFLOPS`, each figure with its
  source), and model FLOP utilisation. `python -m protoseg_jax.costs [--device_kind=..]
  [--peak_tflops=..]` prints the table and the figure that applies.

A train step's abstract arguments: `jax.eval_shape` of the state constructor on `jax.eval_shape` of the
model's init, `jax.ShapeDtypeStruct` batches, and `jax.eval_shape(lambda: jax.random.key(0))` for a key.

What XLA's FLOP count holds (HloCostAnalysis, measured on jax 0.10.2 CPU, pinned by tests/test_costs.py):
dots and convolutions count 2 x MACs (convolutions only over positions that read real input, not the
padding, as `matmul_flops` does); every elementwise op counts one FLOP per output element (adds, multiplies,
compares, selects, converts: e.g. the bf16 -> f32 converts the CPU backend inserts around bf16 dots), and
reductions one per input element; exp / log / tanh / erf etc. go to `transcendentals`, not `flops`.
A while loop's body (scan, fori_loop) is counted ONCE, whatever its trip count: for programs with loops
that do matrix work the jaxpr count is the one to trust (`ProgramCost.while_loops` says how many loops
the compiled program has).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.extend import core as jax_core

GiB = 2 ** 30

# --- peak FLOP rates ---------------------------------------------------------------------------------

_NVIDIA_HOPPER = ('NVIDIA H100/H200 datasheets (nvidia.com/en-us/data-center/h100, /h200): BF16 Tensor '
                  'Core {sparse} TFLOPS "with sparsity"; dense = half')


@dataclasses.dataclass(frozen=True)
class PeakFlops:
  """A chip's bf16 dense matrix peak (per JAX device) and where the figure comes from."""

  key: str
  tflops: float
  source: str


PEAK_TFLOPS: dict[str, PeakFlops] = {p.key: p for p in (
    PeakFlops('h100_sxm', 989.4, _NVIDIA_HOPPER.format(sparse='1,979') + ' (H100 SXM5)'),
    PeakFlops('h100_pcie', 756.0, _NVIDIA_HOPPER.format(sparse='1,513') + ' (H100 PCIe)'),
    PeakFlops('h100_nvl', 835.0, _NVIDIA_HOPPER.format(sparse='1,671') + ' (H100 NVL)'),
    PeakFlops('h200', 989.4, _NVIDIA_HOPPER.format(sparse='1,979') + ' (H200 SXM; same tensor cores as '
              'H100 SXM, more and faster HBM)'),
    PeakFlops('h200_nvl', 835.0, _NVIDIA_HOPPER.format(sparse='1,671') + ' (H200 NVL)'),
    PeakFlops('h200_workplace', 790.0, "this workplace's notes for the lent H200 "
              '(/work/shared/spec/performance.md; origin of the figure not recorded). Not the default: '
              'select it with --peak_tflops=790 or peak_tflops(key="h200_workplace")'),
    PeakFlops('a100', 312.0, 'NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 Tensor Core '
              '312 TFLOPS dense (624 with sparsity), SXM4 and PCIe, 40 and 80 GB'),
    PeakFlops('tpu_v4', 275.0, 'Google Cloud TPU v4 docs (cloud.google.com/tpu/docs/v4): peak compute per '
              'chip 275 TFLOPS bf16 (one JAX device per chip)'),
    PeakFlops('tpu_v5e', 197.0, 'Google Cloud TPU v5e docs (cloud.google.com/tpu/docs/v5e): peak compute '
              'per chip 197 TFLOPS bf16'),
    PeakFlops('tpu_v5p', 459.0, 'Google Cloud TPU v5p docs (cloud.google.com/tpu/docs/v5p): peak compute '
              'per chip 459 TFLOPS bf16 (one JAX device per chip)'),
    PeakFlops('tpu_v6e', 918.0, 'Google Cloud TPU v6e (Trillium) docs (cloud.google.com/tpu/docs/v6e): '
              'peak compute per chip 918 TFLOPS bf16'),
)}

# `device_kind` (lower-cased) patterns -> table key, most specific first. The strings JAX reports (CUDA's
# device name; the TPU runtime's kind): 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe', 'NVIDIA H100
# NVL', 'NVIDIA H200', 'NVIDIA A100-SXM4-80GB', 'NVIDIA A100 80GB PCIe', 'TPU v4', 'TPU v5 lite' (v5e),
# 'TPU v5' (v5p), 'TPU v6 lite' (v6e). 'TPU v4 lite' (v4i) is not in the table. A GH200's GPU matches
# 'h200' and has the same 989 TFLOP/s figure.
DEVICE_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    (r'h100.*pcie', 'h100_pcie'),
    (r'h100.*nvl', 'h100_nvl'),
    (r'h100', 'h100_sxm'),
    (r'h200.*nvl', 'h200_nvl'),
    (r'h200', 'h200'),
    (r'a100', 'a100'),
    (r'tpu v4(?! lite)', 'tpu_v4'),
    (r'tpu v5 ?(lite|e)', 'tpu_v5e'),
    (r'tpu v5p?$', 'tpu_v5p'),
    (r'tpu v6 ?(lite|e)', 'tpu_v6e'),
)

UNKNOWN_PEAK = PeakFlops('unknown', math.nan, 'device kind not in PEAK_TFLOPS: pass --peak_tflops')


def peak_tflops(device_kind: Optional[str] = None, override: Optional[float] = None,
                key: Optional[str] = None) -> PeakFlops:
  """The bf16 dense peak for `device_kind` (default: `jax.devices()[0].device_kind`).

  `override` (TFLOP/s, e.g. a `--peak_tflops` flag) wins over everything, then an explicit table `key`;
  an unknown kind (a CPU, a new chip) gives `UNKNOWN_PEAK`, whose NaN makes `mfu` NaN rather than fail.
  The H200's default is NVIDIA's datasheet figure (989.4): MFU is conventionally measured against the
  theoretical peak (PaLM, Chowdhery et al. 2022), it keeps H100 and H200 runs comparable (same tensor
  cores), and it is the stricter reading of a "40 % of the chip's FLOP limit" target (40 % of 989 is
  50 % of the workplace's 790).
  """
  if override is not None:
    return PeakFlops('override', float(override), 'given on the command line (--peak_tflops)')
  if key is not None:
    return PEAK_TFLOPS[key]
  if device_kind is None:
    device_kind = jax.devices()[0].device_kind
  kind = device_kind.strip().lower()
  for pattern, table_key in DEVICE_KIND_PATTERNS:
    if re.search(pattern, kind):
      return PEAK_TFLOPS[table_key]
  return UNKNOWN_PEAK


def mfu(flops: float, seconds: float, peak: PeakFlops | float) -> float:
  """Model FLOP utilisation `flops / seconds / peak` in [0, 1]; NaN when the peak is unknown (NaN)."""
  tflops = peak.tflops if isinstance(peak, PeakFlops) else float(peak)
  if not seconds > 0 or not tflops > 0:  # also catches NaN
    return math.nan
  return flops / seconds / (tflops * 1e12)


# --- XLA's view ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """XLA's accounting of one compiled program (one device). Sizes in bytes, times in seconds."""

  flops: float                  # cost_analysis 'flops' (while bodies counted once, see module doc)
  transcendentals: float
  bytes_accessed: float         # cost_analysis 'bytes accessed' (per the backend's own fusion decisions)
  argument_bytes: int
  output_bytes: int
  temp_bytes: int               # XLA's one temp allocation: peak of the live temporaries, packed
  alias_bytes: int              # output bytes living in donated argument buffers
  generated_code_bytes: int
  xla_peak_bytes: float         # memory_analysis().peak_memory_in_bytes if reported, else NaN
  while_loops: int              # while instructions in the optimized HLO
  lower_seconds: float
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """Peak device memory estimate of one call: argument + output + temp - alias.

    Arguments and outputs are live for the whole call, temporaries are the backend's single buffer sized
    to their peak, and aliased (donated) outputs reuse argument memory. Not counted: the framework's own
    reservations and arrays held outside the call. Compiled for the CPU, the figure is an estimate of the
    GPU's (another backend fuses and lays out buffers differently; the CPU also upcasts bf16 ops to f32).
    """
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  def per_image(self, batch: int) -> dict:
    """Row for a table: GFLOP/img, GB accessed/img, peak GiB, compile s."""
    return {'gflop_per_image': self.flops / batch / 1e9,
            'gb_accessed_per_image': self.bytes_accessed / batch / 1e9,
            'peak_gib': self.peak_bytes / GiB, 'compile_seconds': self.compile_seconds}


def cost_dict(compiled: Any) -> dict:
  """`compiled.cost_analysis()` as one dict: newer jax returns a dict, older ones a list of per-module
  dicts (summed here), some backends None ({})."""
  cost = compiled.cost_analysis()
  if cost is None:
    return {}
  if isinstance(cost, dict):
    return dict(cost)
  total: dict = {}
  for part in cost:
    for name, value in (part or {}).items():
      total[name] = total.get(name, 0.0) + float(value)
  return total


def abstract(tree: Any) -> Any:
  """Arrays (and anything with shape and dtype) -> `jax.ShapeDtypeStruct`s, same tree; keeps shardings."""
  def one(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, 'dtype'):
      return leaf
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=getattr(leaf, 'sharding', None))
  return jax.tree.map(one, tree)


def compiled_cost(fn: Callable, *args) -> ProgramCost:
  """Lowers and compiles `fn` (jitted, or wrapped in `jax.jit` here) for `args` -> `ProgramCost`.

  `args` may be `jax.ShapeDtypeStruct`s: nothing runs. A donating jit reports its aliasing.
  """
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  cost = cost_dict(compiled)
  memory = compiled.memory_analysis()
  get = lambda name: int(getattr(memory, name, 0) or 0) if memory is not None else 0
  xla_peak = getattr(memory, 'peak_memory_in_bytes', None) if memory is not None else None
  try:
    hlo = compiled.as_text() or ''
  except Exception:  # pylint: disable=broad-except  # some runtimes cannot print their executable
    hlo = ''
  return ProgramCost(
      flops=float(cost.get('flops', math.nan)), transcendentals=float(cost.get('transcendentals', 0.0)),
      bytes_accessed=float(cost.get('bytes accessed', math.nan)),
      argument_bytes=get('argument_size_in_bytes'), output_bytes=get('output_size_in_bytes'),
      temp_bytes=get('temp_size_in_bytes'), alias_bytes=get('alias_size_in_bytes'),
      generated_code_bytes=get('generated_code_size_in_bytes'),
      xla_peak_bytes=float(xla_peak) if xla_peak is not None else math.nan,
      while_loops=len(re.findall(r'\bwhile\(', hlo)),
      lower_seconds=lowered_at - start, compile_seconds=compiled_at - lowered_at)


# --- the jaxpr's view: matmuls and convolutions ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MatmulOp:
  """One `dot_general` / `conv_general_dilated` of a jaxpr. `flops` = `count` x 2 x MACs of one call."""

  primitive: str                # 'dot_general' | 'conv_general_dilated'
  name: str                     # name stack (Flax module path; 'transpose(jvp(...))' = backward pass)
  lhs: tuple                    # shape
  rhs: tuple
  out: tuple
  lhs_dtype: str
  rhs_dtype: str
  out_dtype: str
  preferred_element_type: Optional[str]
  precision: Optional[str]
  count: int                    # calls (loop trip counts x identical ops merged by `group_matmuls`)
  flops: float

  @property
  def backward(self) -> bool:
    return 'transpose(' in self.name

  @property
  def f32(self) -> bool:
    """An f32 (or wider) operand, or HIGHEST precision: what a bf16 program should not have at scale."""
    wide = ('float32', 'float64')
    return self.lhs_dtype in wide or self.rhs_dtype in wide or 'HIGHEST' in (self.precision or '')


@dataclasses.dataclass(frozen=True)
class MatmulCount:
  """`matmul_flops` result: FLOPs by primitive and the loops whose trip count had to be guessed as 1."""

  dot_flops: float
  conv_flops: float
  f32_flops: float              # of which with an f32 operand or HIGHEST precision
  unknown_trip_loops: int       # while loops with a dynamic trip count (body counted once)
  cond_count: int               # conds (the costliest branch counted)

  @property
  def flops(self) -> float:
    return self.dot_flops + self.conv_flops


def _dot_macs(lhs: Sequence[int], rhs: Sequence[int], dimension_numbers) -> int:
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  batch = math.prod(lhs[d] for d in lhs_batch)
  contract = math.prod(lhs[d] for d in lhs_contract)
  lhs_free = math.prod(n for d, n in enumerate(lhs) if d not in (*lhs_contract, *lhs_batch))
  rhs_free = math.prod(n for d, n in enumerate(rhs) if d not in (*rhs_contract, *rhs_batch))
  return batch * contract * lhs_free * rhs_free


def _valid_window_pairs(in_size: int, kernel: int, out_size: int, stride: int, padding: tuple[int, int],
                        lhs_dilation: int, rhs_dilation: int) -> int:
  """Sum over output positions of the kernel taps that land on real input (not padding or dilation holes)."""
  out_index = np.arange(out_size)[:, None]
  tap = np.arange(kernel)[None, :]
  position = out_index * stride + tap * rhs_dilation - padding[0]
  valid = (position >= 0) & (position <= (in_size - 1) * lhs_dilation) & (position % lhs_dilation == 0)
  return int(valid.sum())


def _conv_macs(lhs: Sequence[int], rhs: Sequence[int], out: Sequence[int], params: dict) -> int:
  """MACs of `conv_general_dilated`: out batch x Σ valid window pairs x rhs in-features x rhs out-features.

  The rhs in-feature dimension is already `C_in / feature_group_count`; with `batch_group_count` the output
  batch is the per-group batch. Padding taps are not counted (XLA does the same).
  """
  lhs_spec, rhs_spec, out_spec = params['dimension_numbers']
  spatial = 1
  for i in range(len(lhs_spec) - 2):
    spatial *= _valid_window_pairs(
        lhs[lhs_spec[2 + i]], rhs[rhs_spec[2 + i]], out[out_spec[2 + i]], params['window_strides'][i],
        tuple(params['padding'][i]), (params.get('lhs_dilation') or (1,) * 8)[i],
        (params.get('rhs_dilation') or (1,) * 8)[i])
  return out[out_spec[0]] * spatial * rhs[rhs_spec[1]] * rhs[rhs_spec[0]]


def _sub_jaxprs(value: Any):
  """Jaxprs inside one eqn param value (a ClosedJaxpr, a Jaxpr, or a tuple of them)."""
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def _literal(var: Any) -> Optional[int]:
  value = getattr(var, 'val', None)
  if isinstance(var, jax_core.Literal) and np.ndim(value) == 0:
    return int(value)
  return None


def _while_trip_count(eqn: Any) -> Optional[int]:
  """Static trip count of a fori-style while: `cond: i < n`, `body: i + 1`, i and n literals; else None."""
  cond, body = eqn.params['cond_jaxpr'].jaxpr, eqn.params['body_jaxpr'].jaxpr
  cond_consts, body_consts = eqn.params['cond_nconsts'], eqn.params['body_nconsts']
  if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != 'lt':
    return None
  carry_in = list(cond.invars[cond_consts:])
  init = eqn.invars[cond_consts + body_consts:]
  bounds = []
  for operand in cond.eqns[0].invars:
    if operand in carry_in:
      bounds.append(('carry', carry_in.index(operand)))
    elif _literal(operand) is not None:
      bounds.append(('value', _literal(operand)))
    else:
      return None
  if bounds[0][0] != 'carry':
    return None
  counter = bounds[0][1]
  start = _literal(init[counter])
  stop = bounds[1][1] if bounds[1][0] == 'value' else _literal(init[bounds[1][1]])
  if start is None or stop is None:
    return None
  step_out = body.outvars[counter]
  steps = [e for e in body.eqns if step_out in e.outvars]
  if (len(steps) != 1 or steps[0].primitive.name != 'add'
      or body.invars[body_consts + counter] not in steps[0].invars
      or 1 not in [_literal(v) for v in steps[0].invars]):
    return None
  return max(stop - start, 0)


# Primitives whose sub-jaxpr outputs are the eqn's outputs one to one (dead-code elimination passes the
# used-output mask into them); other sub-jaxprs (loops, conds, unknown) keep all their outputs.
_ONE_TO_ONE = ('pjit', 'jit', 'closed_call', 'core_call', 'custom_jvp_call', 'custom_vjp_call',
               'custom_vjp_call_jaxpr', 'remat', 'checkpoint', 'shard_map')


def _live_eqns(jaxpr: Any, used_outputs: Optional[Sequence[bool]], dce: bool) -> list:
  """[(eqn, used output mask)] of the eqns that reach a used output (or have effects), in order."""
  if not dce:
    return [(eqn, [True] * len(eqn.outvars)) for eqn in jaxpr.eqns]
  used_outputs = used_outputs if used_outputs is not None else [True] * len(jaxpr.outvars)
  live = {v for v, used in zip(jaxpr.outvars, used_outputs) if used and isinstance(v, jax_core.Var)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    used = [isinstance(v, jax_core.Var) and v in live for v in eqn.outvars]
    if any(used) or eqn.effects:
      kept.append((eqn, used))
      live.update(v for v in eqn.invars if isinstance(v, jax_core.Var))
  return kept[::-1]


def _walk(jaxpr: Any, multiplier: int, prefix: str, out: list, stats: dict,
          used_outputs: Optional[Sequence[bool]] = None, dce: bool = True) -> None:
  for eqn, used in _live_eqns(jaxpr, used_outputs, dce):
    name = eqn.primitive.name
    stack = str(eqn.source_info.name_stack)
    path = '/'.join(part for part in (prefix, stack) if part)
    if name in ('dot_general', 'conv_general_dilated'):
      lhs, rhs, result = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
      if name == 'dot_general':
        macs = _dot_macs(lhs.shape, rhs.shape, eqn.params['dimension_numbers'])
      else:
        macs = _conv_macs(lhs.shape, rhs.shape, result.shape, eqn.params)
      preferred = eqn.params.get('preferred_element_type')
      precision = eqn.params.get('precision')
      out.append(MatmulOp(name, path, tuple(lhs.shape), tuple(rhs.shape), tuple(result.shape),
                          str(lhs.dtype), str(rhs.dtype), str(result.dtype),
                          str(np.dtype(preferred)) if preferred is not None else None,
                          str(precision) if precision is not None else None, multiplier,
                          2.0 * macs * multiplier))
      continue
    if name == 'scan':
      _walk(eqn.params['jaxpr'].jaxpr, multiplier * int(eqn.params['length']), path, out, stats, dce=dce)
      continue
    if name == 'while':
      trips = _while_trip_count(eqn)
      if trips is None:
        stats['unknown_trip_loops'] += 1
        trips = 1
      _walk(eqn.params['body_jaxpr'].jaxpr, multiplier * trips, path, out, stats, dce=dce)
      continue
    if name == 'cond':
      stats['cond_count'] += 1
      best: list = []
      for branch in eqn.params['branches']:
        candidate: list = []
        _walk(branch.jaxpr, multiplier, path, candidate, stats, used, dce)
        if sum(op.flops for op in candidate) >= sum(op.flops for op in best):
          best = candidate
      out.extend(best)
      continue
    label = eqn.params.get('name') if name in ('pjit', 'jit', 'closed_call') else None
    inner_used = used if name in _ONE_TO_ONE else None
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        mask = inner_used if inner_used is not None and len(sub.outvars) == len(used) else None
        _walk(sub, multiplier, '/'.join(p for p in (path, label) if p), out, stats, mask, dce)


def _closed_jaxpr(fn_or_jaxpr: Any, args: Sequence[Any]):
  if isinstance(fn_or_jaxpr, jax_core.ClosedJaxpr):
    return fn_or_jaxpr
  return jax.make_jaxpr(fn_or_jaxpr)(*args)


def list_matmuls(fn_or_jaxpr: Any, *args, grouped: bool = True, dce: bool = True) -> list[MatmulOp]:
  """Every matmul / conv of `jax.make_jaxpr(fn)(*args)` (or of a given ClosedJaxpr), costliest first.

  `args` may be `jax.ShapeDtypeStruct`s. With `dce`, ops whose results reach no output are dropped first
  (as XLA would: e.g. the primal forward of `jax.grad` of a linear function); XLA's other rewrites (CSE of
  identical ops, algebraic simplification) are not modelled, so a jaxpr count above XLA's points at
  duplicated work XLA merged. With `grouped`, identical ops (same name, shapes, dtypes) are merged
  (`count` adds up), as `group_matmuls`.
  """
  ops: list = []
  stats = {'unknown_trip_loops': 0, 'cond_count': 0}
  _walk(_closed_jaxpr(fn_or_jaxpr, args).jaxpr, 1, '', ops, stats, dce=dce)
  if grouped:
    ops = group_matmuls(ops)
  return sorted(ops, key=lambda op: -op.flops)


def group_matmuls(ops: Sequence[MatmulOp], key: Optional[Callable[[MatmulOp], Any]] = None) -> list[MatmulOp]:
  """Merges ops with the same `key` (default: everything but `count` and `flops`), summing those two."""
  key = key or (lambda op: dataclasses.replace(op, count=0, flops=0.0))
  merged: dict = {}
  for op in ops:
    k = key(op)
    if k in merged:
      first = merged[k]
      merged[k] = dataclasses.replace(first, count=first.count + op.count, flops=first.flops + op.flops)
    else:
      merged[k] = op
  return sorted(merged.values(), key=lambda op: -op.flops)


def matmul_flops(fn_or_jaxpr: Any, *args, dce: bool = True) -> MatmulCount:
  """2 x MACs of the matmuls and convolutions of `fn(*args)`'s jaxpr (see `list_matmuls`)."""
  ops: list = []
  stats = {'unknown_trip_loops': 0, 'cond_count': 0}
  _walk(_closed_jaxpr(fn_or_jaxpr, args).jaxpr, 1, '', ops, stats, dce=dce)
  return MatmulCount(dot_flops=sum(op.flops for op in ops if op.primitive == 'dot_general'),
                     conv_flops=sum(op.flops for op in ops if op.primitive != 'dot_general'),
                     f32_flops=sum(op.flops for op in ops if op.f32), **stats)


def format_matmuls(ops: Sequence[MatmulOp], top: int = 30, per: float = 1.0, unit: str = 'GFLOP') -> str:
  """A text table of the `top` costliest ops; FLOPs divided by `per` (e.g. the batch: GFLOP/img)."""
  total = sum(op.flops for op in ops) or 1.0
  lines = [f'{unit:>10} {"%":>6} {"n":>5} {"bwd":>3} {"f32":>3}  {"op":<5} {"lhs x rhs -> out":<52} '
           f'{"dtypes":<28} name']
  for op in list(ops)[:top]:
    shapes = f'{list(op.lhs)} x {list(op.rhs)} -> {list(op.out)}'
    dtypes = f'{_short(op.lhs_dtype)},{_short(op.rhs_dtype)}->{_short(op.out_dtype)}{_precision_tag(op)}'
    lines.append(f'{op.flops / per / 1e9:>10.3f} {100 * op.flops / total:>6.2f} {op.count:>5} '
                 f'{"b" if op.backward else "":>3} {"F" if op.f32 else "":>3}  '
                 f'{"dot" if op.primitive == "dot_general" else "conv":<5} {shapes:<52} {dtypes:<28} '
                 f'{op.name}')
  rest = list(ops)[top:]
  if rest:
    lines.append(f'{sum(op.flops for op in rest) / per / 1e9:>10.3f} '
                 f'{100 * sum(op.flops for op in rest) / total:>6.2f}  ... {len(rest)} more')
  return '\n'.join(lines)


def _precision_tag(op: MatmulOp) -> str:
  """' HIGHEST' / ' HIGH' / ' <algorithm preset>' when the op asks for one, else ''."""
  precision = op.precision or ''
  for tag in ('HIGHEST', 'HIGH'):
    if f'Precision.{tag}' in precision or precision == tag:
      return ' ' + tag
  return ' ' + precision if precision and 'DEFAULT' not in precision else ''


def _short(dtype: str) -> str:
  return {'float32': 'f32', 'bfloat16': 'bf16', 'float16': 'f16', 'float64': 'f64'}.get(dtype, dtype)


# --- command line: the peak table ----------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m protoseg_jax.costs [--device_kind=...] [--peak_tflops=...]`: the peak table, and the figure
  MFU would use here."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--device_kind', default=None, help="default: jax.devices()[0].device_kind")
  parser.add_argument('--peak_tflops', type=float, default=None, help='override the table (TFLOP/s)')
  flags = parser.parse_args(argv)
  for peak in PEAK_TFLOPS.values():
    print(f'{peak.key:<16}{peak.tflops:>8.1f}  {peak.source}')
  kind = flags.device_kind if flags.device_kind is not None else jax.devices()[0].device_kind
  chosen = peak_tflops(kind, flags.peak_tflops)
  print(f'\ndevice kind {kind!r} -> {chosen.key}: {chosen.tflops} TFLOP/s ({chosen.source})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
