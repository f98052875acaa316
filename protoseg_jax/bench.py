"""Speed you can prove: `python -m protoseg_jax.bench --config=CONFIG [--what=...] [--compile_only]`.

For every program of the method (`Method.bench_workloads`: train step, inference forward, TTA scores,
window inference, ...) the table reports, from the compiled program itself:
  GFLOP/img   XLA's cost analysis (`costs.compiled_cost`; while-loop bodies counted once) and, beside it,
              the analytic matmul/conv count of the jaxpr (`costs.matmul_flops`, loops times their trip count)
  GB/img      bytes accessed (cost analysis)
  peak GiB    argument + output + temp - alias of the compiled program (memory analysis)
and, unless `--compile_only`, when run on random weights and tiles: img/s, ms/step and MFU (matmul FLOPs /
s / the chip's bf16 dense peak, `costs.peak_tflops`; `--peak_tflops` for an unknown chip). `--compile_only`
never executes nor allocates a full-size input, so full-size programs are accounted for on a CPU.
Extra rows: `pipeline` (the method's own host input pipeline on its configured data: batches/s, img/s per
host core, and the fraction of a step the device would wait at the measured step time) and `slides` (a
synthetic slide through `protoseg_jax.slides`: tiles/s, seconds, input wait). `--json=PATH` writes the rows;
`--profile_dir=DIR` records a `jax.profiler` trace of a few timed train steps.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from typing import Optional, Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from protoseg_jax import costs, logs, registry
from protoseg_jax.method import Method, Workload

WHAT = ('train', 'inference', 'tta', 'pipeline', 'slides')

def _time(fn, args: tuple, steps: int, donate: bool, profile_dir: Optional[str]) -> tuple[float, float]:
  """(seconds per call, device peak GiB) of `fn(*args)` after two warm-up calls; a donating train step
  gets its own output state back as input."""
  state = list(args)

  def call():
    out = fn(*state)
    if donate:
      state[0] = out[0]
    return out

  for _ in range(2):
    jax.block_until_ready(call())
  if profile_dir:
    jax.profiler.start_trace(profile_dir)
  start = time.perf_counter()
  for _ in range(steps):
    out = call()
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / steps
  if profile_dir:
    jax.profiler.stop_trace()
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return seconds, peak / 2 ** 30 if peak is not None else math.nan


def workload_row(workload: Workload, peak: costs.PeakFlops, steps: int, compile_only: bool,
                 profile_dir: Optional[str] = None) -> dict:
  cost = costs.compiled_cost(workload.fn, *workload.abstract_args)
  matmuls = costs.matmul_flops(workload.fn, *workload.abstract_args)
  row = {'workload': workload.name, 'batch': workload.images, **cost.per_image(workload.images),
         'matmul_gflop_per_image': matmuls.flops / workload.images / 1e9,
         'f32_matmul_share': matmuls.f32_flops / matmuls.flops if matmuls.flops else math.nan,
         'xla_gflop_per_step': cost.flops / 1e9, 'while_loops': cost.while_loops}
  if not compile_only:
    seconds, device_peak = _time(workload.fn, workload.make_args(), steps, workload.donate,
                                 profile_dir if workload.donate else None)
    row.update(seconds=seconds, images_per_s=workload.images / seconds, ms_per_step=1e3 * seconds,
               mfu=costs.mfu(matmuls.flops, seconds, peak), device_peak_gib=device_peak)
  return row


def pipeline_row(method: Method, workdir: str, batches: int, step_seconds: Optional[float]) -> dict:
  """The method's host input on its configured data: batches/s over `batches` batches after the first."""
  data = method.train_data(workdir, 0, 1)
  iterator = data.iterator(None)
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = (time.perf_counter() - start) / batches
  iterator.close()
  cores = os.cpu_count() or 1
  row = {'workload': 'input pipeline (host)', 'batch': data.images_per_step, 'seconds': seconds,
         'images_per_s': data.images_per_step / seconds,
         'images_per_s_per_core': data.images_per_step / seconds / cores, 'host_cores': cores}
  if step_seconds:
    row['input_wait_fraction'] = max(0.0, 1.0 - step_seconds / seconds)
  return row


def slides_row(method: Method, config, workdir: str, slide_px: int) -> dict:
  """A synthetic slide through the slide path with the method's own (randomly initialised) model."""
  from protoseg_jax import evaluation, sharding, slides  # pylint: disable=g-import-not-at-top

  params, extra = jax.jit(method.random_variables)(jax.random.key(0))
  mesh = sharding.make_mesh(config.mesh)
  replicated = sharding.replicated(mesh)
  param_shardings = jax.tree.map(lambda _: replicated, params)
  extra_shardings = jax.tree.map(lambda _: replicated, extra)
  evaluator = evaluation.Evaluator(method, config, mesh, param_shardings, extra_shardings, 'slides')
  scores_call = evaluator.scores_call(params, extra, evaluator.statics(params, extra))
  unknown = np.full((config.eval.batch_size, method.num_label_classes), -1, np.int32)
  result = slides.bench_slide(lambda tiles: scores_call(tiles, unknown[:len(tiles)]), size_px=slide_px,
                              level0_mpp=config.data.mpp / 2, model_mpp=config.data.mpp,
                              tile_size=config.data.image_size, batch_size=config.eval.batch_size,
                              config_slides=config.slides, workdir=os.path.join(workdir, 'slides_bench'),
                              class_names=method.value_names, palette=method.palette,
                              background_value=method.background_value)
  return {'workload': f'slide {slide_px}² px (read + infer + write)', 'batch': config.eval.batch_size,
          'images_per_s': result['tiles_per_s'], 'seconds_per_slide': result['seconds_per_slide'],
          'input_wait_fraction': result['input_wait_fraction'], 'tiles': result['tiles'],
          'peak_rss_mb': result['peak_rss_mb']}


def run(config, what: Sequence[str], steps: int = 10, batch_size: Optional[int] = None,
        compile_only: bool = False, peak_tflops: Optional[float] = None, workdir: Optional[str] = None,
        profile_dir: Optional[str] = None, slide_px: int = 4096) -> list[dict]:
  unknown = sorted(set(what) - set(WHAT))
  if unknown:
    raise ValueError(f'--what: unknown rows {unknown}; choose from {WHAT}')
  method = registry.build(config)
  peak = costs.peak_tflops(override=peak_tflops)
  rows = [workload_row(workload, peak, steps, compile_only, profile_dir)
          for workload in method.bench_workloads(what, batch_size or None)]
  workdir = workdir or tempfile.mkdtemp(prefix='protoseg_bench_')
  if 'pipeline' in what and not compile_only:
    train_seconds = next((row.get('seconds') for row in rows if row['workload'].endswith('train') or
                          ' train ' in row['workload'] + ' '), None)
    rows.append(pipeline_row(method, workdir, max(steps, 4), train_seconds))
  if 'slides' in what and not compile_only:
    rows.append(slides_row(method, config, workdir, slide_px))
  for row in rows:
    row['peak_tflops'] = peak.tflops
  return rows


def _fmt(value, spec: str) -> str:
  return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else '-'


def format_table(rows: list[dict], peak: Optional[costs.PeakFlops] = None) -> str:
  device = jax.devices()[0]
  peak = peak or costs.peak_tflops()
  lines = [f'device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), jax '
           f'{jax.__version__}; MFU against {_fmt(peak.tflops, ".0f")} TFLOP/s bf16 dense ({peak.source})',
           f'{"workload":<44}{"batch":>6}{"img/s":>10}{"ms/step":>10}{"GFLOP/img":>11}{"matmul":>9}'
           f'{"GB/img":>8}{"MFU":>7}{"peak GiB":>9}{"wait":>6}']
  for row in rows:
    wait = 100 * row['input_wait_fraction'] if 'input_wait_fraction' in row else math.nan
    lines.append(f'{row["workload"]:<44}{row["batch"]:>6}{_fmt(row.get("images_per_s"), "10.1f"):>10}'
                 f'{_fmt(row.get("ms_per_step"), "10.1f"):>10}{_fmt(row.get("gflop_per_image"), "11.2f"):>11}'
                 f'{_fmt(row.get("matmul_gflop_per_image"), "9.2f"):>9}'
                 f'{_fmt(row.get("gb_accessed_per_image"), "8.3f"):>8}'
                 f'{_fmt(100 * row["mfu"] if "mfu" in row else math.nan, "6.1f"):>7}'
                 f'{_fmt(row.get("peak_gib"), "9.2f"):>9}'
                 f'{_fmt(wait, "5.0f"):>6}')
  lines.append('GFLOP/img: XLA cost analysis; matmul: analytic dot/conv count; MFU on the matmul count; peak '
               'GiB: compiled argument + output + temp - alias; wait: % of a step the device waits for input')
  return '\n'.join(lines)


def _define_flags() -> dict:
  """The CLI's flags, defined only when run as a program (the module is also imported as a library)."""
  return {
      'config': config_flags.DEFINE_config_file('config', None, 'Config file with get_config().',
                                                lock_config=True),
      'what': flags.DEFINE_list('what', ['train', 'inference', 'tta'], f'Rows: any of {", ".join(WHAT)}.'),
      'steps': flags.DEFINE_integer('steps', 10, 'Timed calls per program (after 2 warm-up calls).'),
      'batch_size': flags.DEFINE_integer('batch_size', 0, 'Batch of every program (0 = the config\'s).'),
      'compile_only': flags.DEFINE_boolean('compile_only', False,
                                           'Account for the compiled programs, run nothing.'),
      'peak_tflops': flags.DEFINE_float('peak_tflops', None,
                                        'bf16 dense peak of the chip, TFLOP/s (default: by device kind).'),
      'json': flags.DEFINE_string('json', None, 'Write the rows as JSON here.'),
      'profile_dir': flags.DEFINE_string('profile_dir', None,
                                         'Write a jax.profiler trace of the timed train steps here.'),
      'workdir': flags.DEFINE_string('workdir', None, 'Data folder of the pipeline / slides rows (default: a '
                                     'temporary folder; a synthetic set is written there if configured).'),
      'slide_px': flags.DEFINE_integer('slide_px', 4096, 'Side of the synthetic slide of the slides row.'),
  }


def main(argv, cli: dict):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  value = lambda name: cli[name].value
  rows = run(value('config'), value('what'), value('steps'), value('batch_size') or None,
             value('compile_only'), value('peak_tflops'), value('workdir'), value('profile_dir'),
             value('slide_px'))
  print(format_table(rows, costs.peak_tflops(override=value('peak_tflops'))))
  if value('json'):
    with open(value('json'), 'w') as handle:
      json.dump({'device': jax.devices()[0].device_kind, 'jax': jax.__version__, 'rows': rows}, handle,
                indent=2)


if __name__ == '__main__':
  logs.quiet_library_info()  # before the flags: loading a config may already start JAX
  CLI = _define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(functools.partial(main, cli=CLI))
