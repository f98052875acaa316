"""Throughput benchmark: `python -m protoseg_jax.bench --config=configs/bcss.py [--config.train.batch_size=64]`.

Times the jitted train step and the inference step on random uint8 tiles after warm-up and prints a table:
img/s, step time, XLA's FLOP count per image, achieved TFLOP/s, and peak device memory. DualProtoSeg:
inference = TTA CAM -> mask. MPAMatch configs (`config.method = 'mpamatch'`): the train step of
`config.loss.variant` on labelled + unlabelled batches (img/s counts both), inference = the segmentation
head on `config.eval.batch_size` windows. No dataset or checkpoint is read.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from protoseg_jax import builders, runtime, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file with get_config().',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per measurement (after 2 warm-up steps).')
_WHAT = flags.DEFINE_list('what', ['train', 'inference'], 'Which steps to time.')
flags.mark_flags_as_required(['config'])


def _flops(jitted, *args) -> float:
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', float('nan')))
  except Exception:  # cost analysis is best effort on some backends
    return float('nan')


def _peak_memory_gib() -> float:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return peak / 2 ** 30 if peak is not None else float('nan')


def _time(fn, steps: int) -> float:
  """Seconds per call of `fn()` (which returns something to block on), after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def _time_train_step(train_step, state, batch: dict, steps: int) -> tuple[float, float]:
  """(seconds per step, XLA FLOPs per step) of a donating `(state, batch, rng) -> (state, metrics)`."""
  key = jax.random.key(1)
  flops = _flops(train_step, state, batch, key)
  holder = {'state': state}

  def one_step():
    holder['state'], metrics = train_step(holder['state'], batch, key)
    return metrics['loss']

  return _time(one_step, steps), flops


def run_mpamatch(config, steps: int, what: list[str]) -> list[dict]:
  from protoseg_jax.mpamatch import train as mpamatch_train  # pylint: disable=g-import-not-at-top

  model, prompt_ids = mpamatch_train.build_model(config)
  params, batch_stats = mpamatch_train.init_variables(config, model, prompt_ids, jax.random.key(config.seed))
  size, num_classes = config.data.image_size, model.config.num_classes
  window = config.data.train_window or size
  rng = np.random.default_rng(0)
  rows = []
  if 'train' in what:
    labelled, unlabelled = config.train.labelled_batch_size, config.train.unlabelled_batch_size
    optimizer, schedules = mpamatch_train.make_optimizer(config.train, 1000)
    state = mpamatch_train.create_train_state(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, batch_stats),
                                              optimizer, num_classes, model.config.embed_dim)
    train_step = mpamatch_train.make_train_step(model, config, prompt_ids, optimizer, schedules)
    batch = {'x': rng.integers(0, 256, (labelled, window, window, 3), np.uint8),
             'y': rng.integers(0, num_classes, (labelled, window, window), np.uint8)}
    if config.loss.variant != 'supervised':
      batch.update(u=rng.integers(0, 256, (unlabelled, window, window, 3), np.uint8),
                   u_ignore=np.zeros((unlabelled, window, window), np.uint8))
    else:
      unlabelled = 0
    batch = jax.tree.map(jnp.asarray, batch)
    seconds, flops = _time_train_step(train_step, state, batch, steps)
    rows.append({'step': f'train ({config.loss.variant})', 'batch': labelled + unlabelled, 'seconds': seconds,
                 'flops': flops})
  if 'inference' in what:
    batch_size = config.eval.batch_size
    probs_fn = mpamatch_train.make_window_probs_fn(model, config)
    windows = jnp.asarray(rng.integers(0, 256, (batch_size, size, size, 3), np.uint8))
    flops = _flops(probs_fn, params, batch_stats, windows)
    seconds = _time(lambda: probs_fn(params, batch_stats, windows), steps)
    rows.append({'step': 'inference (windows)', 'batch': batch_size, 'seconds': seconds, 'flops': flops})
  return rows


def run(config, steps: int, what: list[str]) -> list[dict]:
  if config.get('method', 'dualprotoseg') == 'mpamatch':
    return _finish(run_mpamatch(config, steps, what))
  model, tokenizer, prompt_ids = runtime.model_and_prompts(config)
  params = builders.init_params(config, model, prompt_ids, tokenizer, jax.random.key(config.seed))
  size, num_classes = config.data.image_size, model.config.num_classes
  rng = np.random.default_rng(0)
  rows = []
  if 'train' in what:
    batch_size = config.train.batch_size
    optimizer, schedule = train.make_optimizer(config.train, 1000)
    # The train step donates its state: give it its own copy so `params` stays valid for inference.
    state = train.create_train_state(jax.tree.map(jnp.copy, params), optimizer)
    train_step = train.make_train_step(model, config, prompt_ids, optimizer, schedule)
    batch = {'images': jnp.asarray(rng.integers(0, 256, (batch_size, size, size, 3), np.uint8)),
             'labels': jnp.asarray(rng.integers(0, 2, (batch_size, num_classes), np.int32))}
    seconds, flops = _time_train_step(train_step, state, batch, steps)
    rows.append({'step': 'train', 'batch': batch_size, 'seconds': seconds, 'flops': flops})
  if 'inference' in what:
    batch_size = config.eval.batch_size
    bank_fn = train.make_bank_fn(model, prompt_ids)
    mask_fn = jax.jit(train.make_mask_fn(model, config))
    bank = bank_fn(params)
    images = jnp.asarray(rng.integers(0, 256, (batch_size, size, size, 3), np.uint8))
    labels = jnp.ones((batch_size, num_classes), jnp.int32)
    flops = _flops(mask_fn, params, bank, images, labels)
    seconds = _time(lambda: mask_fn(params, bank, images, labels), steps)
    passes = len(config.eval.intensity_factors) * (2 if config.eval.hflip else 1)
    rows.append({'step': f'inference ({passes} TTA passes)', 'batch': batch_size, 'seconds': seconds,
                 'flops': flops})
  return _finish(rows)


def _finish(rows: list[dict]) -> list[dict]:
  peak = _peak_memory_gib()
  for row in rows:
    row['images_per_s'] = row['batch'] / row['seconds']
    row['gflop_per_image'] = row['flops'] / row['batch'] / 1e9
    row['tflop_per_s'] = row['flops'] / row['seconds'] / 1e12
    row['peak_memory_gib'] = peak
  return rows


def format_table(rows: list[dict]) -> str:
  device = jax.devices()[0]
  lines = [f'device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), '
           f'jax {jax.__version__}',
           f'{"step":<28}{"batch":>6}{"img/s":>10}{"ms/step":>10}{"GFLOP/img":>11}{"TFLOP/s":>9}'
           f'{"peak GiB":>10}']
  for row in rows:
    lines.append(f'{row["step"]:<28}{row["batch"]:>6}{row["images_per_s"]:>10.1f}'
                 f'{1e3 * row["seconds"]:>10.1f}{row["gflop_per_image"]:>11.2f}{row["tflop_per_s"]:>9.2f}'
                 f'{row["peak_memory_gib"]:>10.2f}')
  return '\n'.join(lines)


def main(argv):
  del argv
  print(format_table(run(_CONFIG.value, _STEPS.value, _WHAT.value)))


if __name__ == '__main__':
  app.run(main)
