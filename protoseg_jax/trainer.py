"""The one training loop of every method: sharded steps, periodic validation, logs, checkpoints, resume.

One process per host; every process runs this loop on its share of the data. The primary process alone
writes metric files; Orbax coordinates the checkpoint writes of all processes. The loop never reads from
the device between log windows, validations and saves.

Faults it survives: SIGTERM / SIGINT (a checkpoint is saved after the current step, then the run returns
`stopped_at_step`; the CLI exits with `errors.EXIT_PREEMPTED`), an unreadable newest checkpoint (moved aside,
the next intact one is resumed), a changed run-defining config (refused, listing the keys, unless
`config.checkpoint.allow_config_change`), and a NaN/Inf loss: the step records the first bad step
(`train_state.guard_nonfinite`); the loop raises `NonFiniteLossError` at its next sync (a log window, a
validation or a save, whichever comes first), before anything of that step or later is saved, so the
checkpoints on disk (and the best) stay finite.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from protoseg_jax import checkpoints, config_base, evaluation, metric_writers, sharding, train_state
from protoseg_jax.errors import CheckpointError, ConfigError, NonFiniteLossError
from protoseg_jax.method import Method, TrainData, TrainState

CHECKPOINT_CHOICES = ('best', 'last')


class StopSignal:
  """Turns SIGTERM (a preemption notice) and SIGINT (Ctrl-C) into a flag the loop polls between steps.

  A second SIGINT interrupts at once (KeyboardInterrupt), for a user who does not want to wait for the save.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[str] = None
    self._previous: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning('%s received: saving a checkpoint after the current step, then stopping (rerun the same '
                    'command to resume)', name)
    self.received = name

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


def total_steps(config: ml_collections.ConfigDict, train_data: TrainData) -> int:
  """Steps of the whole run from `config.train.epochs` (x steps per epoch) or `config.train.steps`, capped by
  `config.train.max_steps` when positive."""
  train = config.train
  if train.get('epochs', 0) > 0:
    if train_data.steps_per_epoch is None:
      raise ConfigError(f'config.train.epochs is set but {config.method} counts in steps: set '
                        'config.train.steps instead')
    steps = train.epochs * train_data.steps_per_epoch
  else:
    steps = train.steps
  if train.get('max_steps', -1) > 0:
    steps = min(steps, train.max_steps)
  if steps <= 0:
    raise ConfigError(f'the run has {steps} steps (config.train.epochs / config.train.steps)')
  return steps


def is_eval_step(done: int, total: int, config: ml_collections.ConfigDict,
                 steps_per_epoch: Optional[int]) -> bool:
  train = config.train
  if done == total:
    return True
  if train.get('eval_every_steps', 0) > 0:
    return done % train.eval_every_steps == 0
  if train.get('eval_every_epochs', 0) > 0 and steps_per_epoch:
    return done % (train.eval_every_epochs * steps_per_epoch) == 0
  return False


def resumable(state: TrainState) -> dict:
  """What a step checkpoint holds of the state: all but the frozen towers (rebuilt from the config)."""
  return {'step': state.step, 'trainable': state.trainable, 'extra': state.extra,
          'opt_state': state.opt_state}


def weights(state: TrainState) -> dict:
  """What a best checkpoint holds: trainable parameters and the extra state."""
  return {'trainable': state.trainable, 'extra': state.extra}


def checkpoint_meta(step: int, fingerprint: float, rng_key: jax.Array, config: ml_collections.ConfigDict,
                    extra: Optional[dict] = None) -> dict:
  return {'step': step, 'frozen_fingerprint': fingerprint,
          'rng_key_data': np.asarray(jax.random.key_data(rng_key)).tolist(),
          'config': config_base.to_json_dict(config), **(extra or {})}


def check_fingerprint(meta: dict, fingerprint: float, where: str) -> None:
  saved = meta.get('frozen_fingerprint')
  if saved is not None and abs(saved - fingerprint) > 1e-6 * max(abs(saved), 1.0):
    raise CheckpointError(f'{where} was trained with different frozen towers (config.seed or config.backbone '
                          'differ from the training run)')


def check_config_unchanged(meta: dict, config: ml_collections.ConfigDict, where: str) -> None:
  saved = meta.get('config')
  if saved is None or config.checkpoint.get('allow_config_change', False):
    return
  changed = config_base.run_defining_changes(saved, config_base.to_json_dict(config))
  if changed:
    raise CheckpointError(f'{where} was trained with another config; changed: {"; ".join(changed)} (use a '
                          'new --workdir, or --config.checkpoint.allow_config_change=True to resume anyway)')


def _nonfinite(state: TrainState) -> int:
  return int(jax.device_get(state.nonfinite_step))


def _raise_nonfinite(bad_step: int, checked_at: int, last_saved: Optional[int], workdir: str) -> None:
  kept = (f'the last checkpoint (step {last_saved}) is intact' if last_saved else 'no checkpoint was written')
  raise NonFiniteLossError(f'step {bad_step + 1}: the loss is NaN or Inf; training stopped at the check '
                           f'after step {checked_at} and saved nothing of it ({kept} in '
                           f'{workdir}/checkpoints). Lower config.train.learning_rate or check the data of '
                           'that step')


def train_and_evaluate(method: Method, config: ml_collections.ConfigDict, workdir: str,
                       should_stop: Optional[Callable[[int], bool]] = None) -> dict:
  """Trains `config.train.epochs` epochs or `config.train.steps` steps, validating on
  `config.data.eval_split` at the configured cadence and after the last step.

  Resumes from the newest intact checkpoint in `workdir/checkpoints` (train state, data order, RNG), so a
  preempted run continues exactly where it stopped. SIGTERM / SIGINT, or `should_stop(step)` returning True
  after a step, saves a checkpoint and returns `{'stopped_at_step': step, 'signal': ...}`. Otherwise returns
  the last validation metrics with `best_step` / `best_score` / `select_metric`.
  """
  os.makedirs(workdir, exist_ok=True)
  process_index, process_count = jax.process_index(), jax.process_count()
  train_data = method.train_data(workdir, process_index, process_count)
  eval_split = config.data.eval_split
  eval_set = method.eval_set(workdir, eval_split, process_index, process_count)
  steps = total_steps(config, train_data)
  steps_per_epoch = train_data.steps_per_epoch
  logging.info('training examples: %d (%s steps/epoch, %d steps), %s examples: %d', train_data.num_examples,
               steps_per_epoch if steps_per_epoch else '-', steps, eval_split, eval_set.num_examples)

  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  params, extra = method.init_variables(init_key)
  trainable, frozen = method.split_params(params)
  fingerprint = checkpoints.tree_checksum(frozen)
  count = lambda tree: int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))
  logging.info('parameters: %s trainable, %s frozen', f'{count(trainable):,}', f'{count(frozen):,}')
  optimizer, schedules = method.optimizer(trainable, steps)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding.logical_rules
  state, shardings = train_state.create_sharded_train_state(params, extra, optimizer, method, mesh, rules)
  del params, extra, trainable, frozen
  logging.info('sharding:\n%s', sharding.describe(state, shardings, mesh))

  manager = checkpoints.TrainCheckpoints(os.path.join(workdir, 'checkpoints'), config.checkpoint.keep,
                                         config.checkpoint.async_save)
  data_state = None
  start_step = 0
  if manager.latest_step() is not None:
    if not config.checkpoint.resume:
      raise CheckpointError(f'{workdir} already holds checkpoints (step {manager.latest_step()}) and '
                            'config.checkpoint.resume is False')
    latest = manager.restore_latest(resumable(state))
    if latest is not None:
      start_step, restored, data_state, meta = latest
      where = f'checkpoint step {start_step} in {workdir}/checkpoints'
      check_fingerprint(meta, fingerprint, where)
      check_config_unchanged(meta, config, where)
      state = state.replace(**restored)
      if 'rng_key_data' in meta:
        step_key = jax.random.wrap_key_data(np.asarray(meta['rng_key_data'], np.uint32))
      logging.info('resumed from step %d', start_step)
  batches = train_data.iterator(data_state)

  step_fn = train_state.jit_train_step(method, optimizer, schedules, mesh, shardings, rules)
  evaluator = evaluation.Evaluator(method, config, mesh, {**shardings.frozen, **shardings.trainable},
                                   shardings.extra)
  writer = metric_writers.MetricWriter(workdir, config.logging.get('tensorboard', True))
  progress = metric_writers.Progress(steps, start_step)
  select = config.eval.select_metric
  saved_step: Optional[int] = start_step or None

  def save(step: int, extra_meta: Optional[dict] = None) -> None:
    nonlocal saved_step
    if step == saved_step:
      return
    if _nonfinite(state) >= 0:
      _raise_nonfinite(_nonfinite(state), step, saved_step, workdir)
    iterator_state = batches.get_state()
    if process_count > 1:
      # One JSON item is written for all hosts, and a host's Grain state describes its own shard; the
      # batches are a pure function of (seed, step), so the step alone restores every host exactly.
      iterator_state = {'step': iterator_state['step']}
    manager.save(step, resumable(state), iterator_state,
                 checkpoint_meta(step, fingerprint, step_key, config, extra_meta))
    saved_step = step

  def validate(done: int) -> dict:
    result = evaluator.evaluate(state.params, state.extra, eval_set)
    result.update(step=done, split=eval_split)
    if steps_per_epoch:
      result['epoch'] = done / steps_per_epoch
    writer.write('eval_metrics', done, result)
    logging.info('%s after step %d:\n%s', eval_split, done, method.format_metrics(result))
    if select not in result:
      raise ConfigError(f'config.eval.select_metric={select!r} is not a metric of {config.method} (have '
                        f'{", ".join(sorted(k for k, v in result.items() if isinstance(v, float)))})')
    score = float(result[select])
    if math.isfinite(score):
      manager.save_best(done, weights(state), score,
                        checkpoint_meta(done, fingerprint, step_key, config, {select: score}))
    else:
      logging.warning('val %s is %s after step %d: not offered as the best checkpoint', select, score, done)
    save(done, {select: score})
    return result

  last_eval: dict = {}
  window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
  try:
    with StopSignal() as stop:
      for step in range(start_step, steps):
        waited = time.perf_counter()
        host_batch = next(batches)
        window_wait += time.perf_counter() - waited
        batch = sharding.shard_host_batch(host_batch, mesh, host_rows=train_data.host_rows)
        state, step_metrics = step_fn(state, batch, step_key)
        done = step + 1
        window_images += train_data.images_per_step
        if done % config.train.log_every_steps == 0 or done == steps:
          record = {key: float(value) for key, value in jax.device_get(step_metrics).items()}
          if _nonfinite(state) >= 0:  # the only host sync of the loop, once per log window
            _raise_nonfinite(_nonfinite(state), done, saved_step, workdir)
          elapsed = time.perf_counter() - window_start
          # Host time blocked on the input pipeline, as a share of the window: the step's dispatch is
          # asynchronous, so this is the share of time the device could have waited for input.
          record.update(step=done, images_per_s=window_images / elapsed,
                        input_wait_fraction=window_wait / elapsed)
          if steps_per_epoch:
            record['epoch'] = done / steps_per_epoch
          writer.write('train_metrics', done, record)
          lr = next((record[k] for k in ('learning_rate', 'lr_head') if k in record), None)
          logging.info('%s', progress.line(done, record['loss'], lr, record['images_per_s']))
          window_start, window_images, window_wait = time.perf_counter(), 0, 0.0
        if is_eval_step(done, steps, config, steps_per_epoch):
          if _nonfinite(state) >= 0:
            _raise_nonfinite(_nonfinite(state), done, saved_step, workdir)
          last_eval = validate(done)
          window_start, window_wait = time.perf_counter(), 0.0
        elif done % config.checkpoint.every_steps == 0:
          save(done)
        external = should_stop is not None and should_stop(done)
        if done < steps and (stop.received or external or manager.reached_preemption(done)):
          save(done)
          logging.warning('stopped at step %d of %d; rerun the same command to resume', done, steps)
          return {'stopped_at_step': done, 'signal': stop.received or ('requested' if external else
                                                                       'preemption'), **last_eval}
    if not last_eval:  # resumed from the final step: nothing left to train, report the state's metrics
      logging.info('the run in %s is complete (step %d); evaluating it', workdir, steps)
      last_eval = evaluator.evaluate(state.params, state.extra, eval_set)
      last_eval.update(step=steps, split=eval_split)
  finally:
    manager.wait()  # a background save completes before the process may exit
    writer.close()
    close = getattr(batches, 'close', None)
    if close is not None:
      close()
  last_eval.update(select_metric=select, best_step=manager.best_step(), best_score=manager.best_score())
  manager.close()
  return last_eval


# --- restoring weights for eval / predict / export -------------------------------------------------------

def parse_checkpoint_choice(text: str) -> str | int:
  """`--checkpoint`: 'best', 'last' or a kept step number."""
  if text in CHECKPOINT_CHOICES:
    return text
  if text.isdigit():
    return int(text)
  raise ConfigError(f"--checkpoint must be 'best', 'last' or a kept step number, got {text!r}")


def restore_weights(method: Method, config: ml_collections.ConfigDict, workdir: str, which: str | int):
  """Weights of a training run in `workdir`, laid out on the mesh of `config.mesh`.

  `which`: 'best' (by `config.eval.select_metric`; a corrupt best falls back to the next best, then to the
  newest intact step), 'last' (the newest intact step) or a step number.
  -> (params (frozen rebuilt from the config + restored trainable), extra, meta, mesh, state shardings).
  """
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(os.path.join(directory, 'steps')):
    raise CheckpointError(f'no checkpoints under {directory}: train first (--mode=train with the same '
                          '--workdir)')
  init_key = jax.random.split(jax.random.key(config.seed))[0]
  frozen = method.frozen_params(init_key)
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding.logical_rules
  abstract_params, abstract_extra = method.abstract_variables(init_key)
  trainable_shapes, _ = method.split_params(abstract_params)
  optimizer, _ = method.optimizer(trainable_shapes, 1)  # the optimizer state's structure only
  abstract = jax.eval_shape(lambda p, e: train_state.create_train_state(p, e, optimizer, method),
                            abstract_params, abstract_extra)
  shardings = train_state.state_shardings(abstract, optimizer, method, mesh, rules)
  target = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                        abstract, shardings)
  manager = checkpoints.TrainCheckpoints(directory, config.checkpoint.keep, async_save=False)
  try:
    restored = None
    if which == 'best':
      restored = manager.restore_best(weights(target))
      if restored is None:
        logging.warning('no readable best checkpoint under %s/best: using the newest intact step', directory)
    if restored is None and which in ('best', 'last'):
      latest = manager.restore_latest(resumable(target))
      if latest is None:
        raise CheckpointError(f'no intact checkpoint under {directory}')
      _, state, _, meta = latest
      restored = ({'trainable': state['trainable'], 'extra': state['extra']}, meta)
    elif restored is None:
      state, _, meta = manager.restore_step(int(which), resumable(target))
      restored = ({'trainable': state['trainable'], 'extra': state['extra']}, meta)
  finally:
    manager.close()
  weights_tree, meta = restored
  check_fingerprint(meta, checkpoints.tree_checksum(frozen), f'checkpoint {which!r} in {directory}')
  params = {**sharding.place_tree(frozen, shardings.frozen), **weights_tree['trainable']}
  logging.info('restored checkpoint %r (step %s%s)', which, meta.get('step'),
               f', val {config.eval.select_metric} {meta[config.eval.select_metric]:.4f}'
               if config.eval.select_metric in meta else '')
  return params, weights_tree['extra'], meta, mesh, shardings

