"""The DualProtoSeg training loop: data, sharded steps, periodic validation, metric logs, checkpoints, resume.

One process per host; every process runs this same loop on its share of the data. Process 0 alone writes the
metric files; Orbax coordinates the checkpoint writes of all processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from protoseg_jax import builders, checkpoints, metrics as metrics_lib, runtime, sharding, train
from protoseg_jax.data import pipeline


class JsonlWriter:
  """Appends one JSON object per line to `<workdir>/<name>.jsonl` (readable by pandas / any plotter).

  Only the primary process writes; the others' writes are no-ops.
  """

  def __init__(self, workdir: str, name: str):
    self.path = os.path.join(workdir, f'{name}.jsonl')
    self.enabled = sharding.is_primary()

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, 'a') as handle:
        handle.write(json.dumps(record) + '\n')


def _to_python(metrics: dict) -> dict:
  return {key: float(value) for key, value in jax.device_get(metrics).items()}


class PreemptionSignal:
  """Turns SIGTERM (a preemption notice) into a flag the loop polls between steps."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after the current step, then stopping')
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def stop_requested(done: int, total_steps: int, should_stop: Optional[Callable[[int], bool]],
                   preemption: PreemptionSignal, manager: checkpoints.TrainCheckpoints) -> bool:
  """After step `done`: stop early (save, return) on SIGTERM, an Orbax preemption notice on any host, or
  `should_stop(done)`; never after the last step."""
  external = should_stop is not None and should_stop(done)
  preempted = preemption.received or manager.reached_preemption(done)
  return done < total_steps and (preempted or external)


def evaluate_source(params: dict, eval_source: pipeline.EvalSource, bank_fn, confusion_fn,
                    config: ml_collections.ConfigDict) -> dict:
  """Confusion matrix over a whole (possibly host-sharded) split -> metrics dict."""
  bank = bank_fn(params)
  # Per-batch int32 matrices are summed on the host in int64 (a split can exceed 2^31 pixels); dispatch
  # stays asynchronous because nothing is read back until the loop ends.
  batch_confusions = [confusion_fn(params, bank, batch) for batch in eval_source.batches()]
  confusion = np.sum([np.asarray(c, np.int64) for c in batch_confusions], axis=0)
  result = metrics_lib.segmentation_metrics(
      confusion, list(config.data.class_names) + [config.data.background_name],
      num_tissue_classes=len(config.data.class_names), ignore_background=config.eval.ignore_background)
  result['confusion_matrix'] = confusion.tolist()
  return result


def _mesh_and_state(config, params, optimizer):
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_global_batch(config.train.batch_size, mesh)
  state, state_shardings = train.create_sharded_train_state(params, optimizer, mesh,
                                                            config.sharding.logical_rules)
  return mesh, state, state_shardings


def _resumable(state: train.TrainState) -> dict:
  """What a checkpoint holds of the state: everything but the frozen towers (rebuilt from the config)."""
  return {'step': state.step, 'trainable': state.trainable, 'opt_state': state.opt_state}


def checkpoint_meta(step: int, fingerprint: float, rng_key: jax.Array, extra: Optional[dict] = None) -> dict:
  return {'step': step, 'frozen_fingerprint': fingerprint,
          'rng_key_data': np.asarray(jax.random.key_data(rng_key)).tolist(), **(extra or {})}


def check_fingerprint(meta: dict, fingerprint: float, where: str) -> None:
  saved = meta.get('frozen_fingerprint')
  if saved is not None and abs(saved - fingerprint) > 1e-6 * max(abs(saved), 1.0):
    raise checkpoints.CheckpointError(
        f'{where} was trained with different frozen towers (config.seed or config.backbone differ from '
        'the training run)')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       should_stop: Optional[Callable[[int], bool]] = None) -> dict:
  """Trains for `config.train.epochs` epochs (or `max_steps`), validating every `eval_every_epochs`.

  Resumes from the newest complete checkpoint in `workdir/checkpoints` (train state, data order, RNG), so a
  preempted run continues exactly where it stopped. SIGTERM, or `should_stop(step)` returning True after a
  step, saves a checkpoint and returns early with `{'stopped_at_step': step}`. Returns the last val metrics.
  """
  os.makedirs(workdir, exist_ok=True)
  model, tokenizer, prompt_ids = runtime.model_and_prompts(config)
  root = pipeline.resolve_root(config.data, workdir)
  global_batch = config.train.batch_size
  train_source = pipeline.make_train_source(config.data, root, global_batch, config.seed,
                                            jax.process_index(), jax.process_count())
  eval_source = pipeline.make_eval_source(config.data, root, config.data.eval_split,
                                          model.config.num_classes, config.eval.batch_size,
                                          jax.process_index(), jax.process_count())
  steps_per_epoch = train_source.steps_per_epoch
  total_steps = config.train.epochs * steps_per_epoch
  if config.train.max_steps > 0:
    total_steps = min(total_steps, config.train.max_steps)
  logging.info('training tiles: %d (%d steps/epoch, %d steps), %s tiles: %d', train_source.num_examples,
               steps_per_epoch, total_steps, config.data.eval_split, eval_source.num_examples)

  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  params = runtime.initial_params(config, model, tokenizer, prompt_ids, init_key)
  fingerprint = runtime.frozen_fingerprint(params)
  counts = builders.parameter_counts(params)
  logging.info('parameters: %s trainable, %s frozen', f'{counts["trainable"]:,}', f'{counts["frozen"]:,}')
  optimizer, schedule = train.make_optimizer(config.train, total_steps)
  mesh, state, state_shardings = _mesh_and_state(config, params, optimizer)
  del params
  logging.info('sharding:\n%s', sharding.describe(state, state_shardings, mesh))

  manager = checkpoints.TrainCheckpoints(os.path.join(workdir, 'checkpoints'), config.checkpoint.keep,
                                         config.checkpoint.async_save)
  data_state = None
  start_step = manager.latest_step()
  if start_step is not None:
    if not config.checkpoint.resume:
      raise checkpoints.CheckpointError(
          f'{workdir} already holds checkpoints (step {start_step}) and config.checkpoint.resume is False')
    restored, data_state, meta = manager.restore(start_step, _resumable(state))
    state = state.replace(**restored)
    check_fingerprint(meta, fingerprint, f'checkpoint step {start_step}')
    if 'rng_key_data' in meta:
      step_key = jax.random.wrap_key_data(np.asarray(meta['rng_key_data'], np.uint32))
    logging.info('resumed from step %d', start_step)
  start_step = start_step or 0
  batches = train_source.iterator(data_state)

  train_step = train.make_sharded_train_step(model, config, prompt_ids, optimizer, schedule, mesh,
                                             state_shardings)
  param_shardings = {**state_shardings.frozen, **state_shardings.trainable}
  bank_fn, confusion_fn = train.make_eval_fns(model, config, prompt_ids, mesh, param_shardings)
  train_log, eval_log = JsonlWriter(workdir, 'train_metrics'), JsonlWriter(workdir, 'eval_metrics')

  saved_step = start_step

  def save(step: int, extra: Optional[dict] = None) -> None:
    nonlocal saved_step
    if step != saved_step:
      data_state = batches.get_state()
      if jax.process_count() > 1:
        # One JSON item is written for all hosts, and a host's Grain state describes its own shard; the
        # batches are a pure function of (seed, step), so the step alone restores every host exactly.
        data_state = {'step': data_state['step']}
      manager.save(step, _resumable(state), data_state, checkpoint_meta(step, fingerprint, step_key, extra))
      saved_step = step

  last_eval: dict = {}
  window_start, window_images = time.perf_counter(), 0
  try:
    with PreemptionSignal() as preemption:
      for step in range(start_step, total_steps):
        host_batch = next(batches)
        batch = sharding.shard_host_batch(host_batch, mesh, global_batch)
        state, step_metrics = train_step(state, batch, step_key)
        done = step + 1
        window_images += global_batch
        if done % config.train.log_every_steps == 0 or done == total_steps:
          record = _to_python(step_metrics)  # the only host sync of the loop, once per log window
          elapsed = time.perf_counter() - window_start
          record.update(step=done, epoch=done / steps_per_epoch, images_per_s=window_images / elapsed)
          train_log.write(record)
          logging.info('step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.1f img/s', done, total_steps,
                       record['epoch'], record['loss'], record['learning_rate'], record['images_per_s'])
          window_start, window_images = time.perf_counter(), 0
        end_of_epoch = done % steps_per_epoch == 0
        if (end_of_epoch and (done // steps_per_epoch) % config.train.eval_every_epochs == 0) or \
            done == total_steps:
          last_eval = evaluate_source(state.params, eval_source, bank_fn, confusion_fn, config)
          last_eval.update(step=done, epoch=done / steps_per_epoch, split=config.data.eval_split)
          eval_log.write(last_eval)
          logging.info('%s after step %d:\n%s', config.data.eval_split, done,
                       metrics_lib.format_metrics_table(last_eval))
          manager.save_best(done, state.trainable, last_eval['mIoU'],
                            checkpoint_meta(done, fingerprint, step_key, {'mIoU': last_eval['mIoU']}))
          save(done, {'mIoU': last_eval['mIoU']})
          window_start = time.perf_counter()
        elif done % config.checkpoint.every_steps == 0:
          save(done)
        if stop_requested(done, total_steps, should_stop, preemption, manager):
          save(done)
          logging.warning('stopped at step %d of %d; rerun the same command to resume', done, total_steps)
          return {'stopped_at_step': done, **last_eval}
    if not last_eval:  # resumed from the final step: nothing left to train, report the state's metrics
      logging.info('the run in %s is complete (step %d); evaluating it', workdir, total_steps)
      last_eval = evaluate_source(state.params, eval_source, bank_fn, confusion_fn, config)
      last_eval.update(step=total_steps, split=config.data.eval_split)
  finally:
    manager.wait()  # a background save completes before the process may exit
    close = getattr(batches, 'close', None)
    if close is not None:
      close()
  return last_eval


def trained_params(config: ml_collections.ConfigDict, workdir: str, which: str, model, tokenizer,
                   prompt_ids) -> tuple[dict, dict]:
  """Parameters of a training run in `workdir`: `which` = 'best' (val mIoU) or 'last' (newest step).

  -> (full params: frozen towers rebuilt from the config + restored trainable params, checkpoint meta).
  """
  if which not in ('best', 'last'):
    raise ValueError(f"--checkpoint must be 'best' or 'last', got {which!r}")
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(os.path.join(directory, 'steps')):
    raise checkpoints.CheckpointError(f'no checkpoints under {directory}: train first (--mode=train with '
                                      'the same --workdir)')
  params = runtime.initial_params(config, model, tokenizer, prompt_ids,
                                  jax.random.split(jax.random.key(config.seed))[0])
  trainable, frozen = builders.split_params(params)
  manager = checkpoints.TrainCheckpoints(directory, config.checkpoint.keep, async_save=False)
  try:
    if which == 'best':
      trainable, meta = manager.restore_best(trainable)
    else:
      step = manager.latest_step()
      if step is None:
        raise checkpoints.CheckpointError(f'no complete checkpoint under {directory}/steps')
      optimizer, _ = train.make_optimizer(config.train, 1)  # the optimizer state's structure only
      target = _resumable(train.create_train_state(params, optimizer))
      restored, _, meta = manager.restore(step, target)
      trainable = restored['trainable']
  finally:
    manager.close()
  check_fingerprint(meta, runtime.frozen_fingerprint(params), f'checkpoint {which!r} in {directory}')
  logging.info('restored checkpoint %r (step %s, val mIoU %s)', which, meta.get('step'), meta.get('mIoU'))
  return {**frozen, **trainable}, meta
