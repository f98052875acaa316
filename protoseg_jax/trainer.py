"""The DualProtoSeg training loop: data, steps, periodic validation, metric logs and checkpoints."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import jax
import ml_collections

from protoseg_jax import builders, metrics as metrics_lib
from protoseg_jax.data import pipeline
from protoseg_jax.train import create_train_state, evaluate, make_eval_fns, make_optimizer, make_train_step


class JsonlWriter:
  """Appends one JSON object per line to `<workdir>/<name>.jsonl` (readable by pandas / any plotter)."""

  def __init__(self, workdir: str, name: str):
    self.path = os.path.join(workdir, f'{name}.jsonl')

  def write(self, record: dict) -> None:
    with open(self.path, 'a') as handle:
      handle.write(json.dumps(record) + '\n')


def _to_python(metrics: dict) -> dict:
  return {key: float(value) for key, value in jax.device_get(metrics).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       params: Optional[dict] = None) -> dict:
  """Trains for `config.train.epochs` epochs, validating every `eval_every_epochs`; returns final metrics.

  Saves `params_last` and `params_best` (by val mIoU) under `workdir/checkpoints`.
  """
  from protoseg_jax import checkpoints, runtime  # local: keeps this module importable without orbax

  os.makedirs(workdir, exist_ok=True)
  model, tokenizer, prompt_ids = runtime.model_and_prompts(config)
  root = pipeline.resolve_root(config.data, workdir)
  train_batches = pipeline.load_train_batches(root, config.data, config.train.batch_size, config.seed)
  eval_set = pipeline.load_eval_set(root, config.data.eval_split, model.config.num_classes,
                                    config.data.image_size, config.data.decode_threads)
  steps_per_epoch = train_batches.steps_per_epoch
  total_steps = config.train.epochs * steps_per_epoch
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)
  logging.info('training tiles: %d (%d steps/epoch, %d steps), %s tiles: %d', len(train_batches.paths),
               steps_per_epoch, total_steps, config.data.eval_split, len(eval_set.names))

  rng = jax.random.key(config.seed)
  init_key, step_key = jax.random.split(rng)
  if params is None:
    params = runtime.initial_params(config, model, tokenizer, prompt_ids, init_key)
  optimizer, schedule = make_optimizer(config.train, total_steps)
  state = create_train_state(params, optimizer)
  manager = checkpoints.ParamsCheckpoints(os.path.join(workdir, 'checkpoints'))
  fingerprint = runtime.frozen_fingerprint(params)
  counts = builders.parameter_counts(params)
  logging.info('parameters: %s trainable, %s frozen', f'{counts["trainable"]:,}', f'{counts["frozen"]:,}')

  train_step = make_train_step(model, config, prompt_ids, optimizer, schedule)
  bank_fn, confusion_fn = make_eval_fns(model, config, prompt_ids)
  train_log, eval_log = JsonlWriter(workdir, 'train_metrics'), JsonlWriter(workdir, 'eval_metrics')

  best_miou, last_eval = -1.0, {}
  window_start, window_images = time.perf_counter(), 0
  batches = train_batches.iterate(start_step=0)
  for step in range(total_steps):
    batch = next(batches)
    state, step_metrics = train_step(state, batch, step_key)
    window_images += config.train.batch_size
    if (step + 1) % config.train.log_every_steps == 0 or step + 1 == total_steps:
      record = _to_python(step_metrics)  # the only host sync of the loop, once per log window
      elapsed = time.perf_counter() - window_start
      record.update(step=step + 1, epoch=(step + 1) / steps_per_epoch, images_per_s=window_images / elapsed)
      train_log.write(record)
      logging.info('step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.1f img/s', step + 1, total_steps,
                   record['epoch'], record['loss'], record['learning_rate'], record['images_per_s'])
      window_start, window_images = time.perf_counter(), 0
    end_of_epoch = (step + 1) % steps_per_epoch == 0
    epoch = (step + 1) // steps_per_epoch
    if (end_of_epoch and epoch % config.train.eval_every_epochs == 0) or step + 1 == total_steps:
      last_eval = evaluate(state.params, eval_set, bank_fn, confusion_fn, config)
      last_eval.update(step=step + 1, epoch=(step + 1) / steps_per_epoch, split=config.data.eval_split)
      eval_log.write(last_eval)
      logging.info('%s after step %d:\n%s', config.data.eval_split, step + 1,
                   metrics_lib.format_metrics_table(last_eval))
      meta = {'step': step + 1, 'mIoU': last_eval['mIoU'], 'frozen_fingerprint': fingerprint}
      manager.save('last', state.trainable, meta)
      if last_eval['mIoU'] > best_miou:
        best_miou = last_eval['mIoU']
        manager.save('best', state.trainable, meta)
      window_start = time.perf_counter()
  return last_eval
