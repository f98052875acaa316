"""The MPAMatch training loop: data, sharded jitted steps, periodic validation, JSONL logs, checkpoints, resume.

Checkpoints use DualProtoSeg's `checkpoints.TrainCheckpoints`: `<workdir>/checkpoints/steps/<step>` holds the
resumable state (step, trainable params, BatchNorm statistics, the image prototype bank, optimizer state),
`<workdir>/checkpoints/best/<step>` the weights of the best validation score. Batches are a pure function of
(seed, step), so the step alone restores the data order.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from protoseg_jax import checkpoints, metrics as metrics_lib, sharding
from protoseg_jax.mpamatch import data as data_lib, infer, train
from protoseg_jax.trainer import (JsonlWriter, PreemptionSignal, check_fingerprint, checkpoint_meta,
                                  stop_requested)

CHECKPOINT_NAMES = ('best', 'last')


def resumable(state: train.TrainState) -> dict:
  """What a step checkpoint holds: everything but the frozen text tower (rebuilt from the config)."""
  return {'step': state.step, 'trainable': state.trainable, 'batch_stats': state.batch_stats,
          'bank': {'prototypes': state.bank.prototypes, 'seen': state.bank.seen},
          'opt_state': state.opt_state}


def weights(state: train.TrainState) -> dict:
  """What the best checkpoint holds: trainable params, BatchNorm statistics, the image prototype bank."""
  return {'params': state.trainable, 'batch_stats': state.batch_stats,
          'bank': {'prototypes': state.bank.prototypes, 'seen': state.bank.seen}}


def setup_data(config: ml_collections.ConfigDict, workdir: str):
  """-> (splits, split dict, split file path)."""
  root = data_lib.resolve_root(config.data, workdir)
  splits = data_lib.list_dataset(config.data, root)
  path = data_lib.split_path(config.data, workdir)
  return splits, data_lib.load_or_create_split(splits, config.data, path), path


def _check_batches(config: ml_collections.ConfigDict, mesh, variant: str) -> None:
  sharding.check_global_batch(config.train.labelled_batch_size, mesh, 'config.train.labelled_batch_size')
  if variant != 'supervised':
    sharding.check_global_batch(config.train.unlabelled_batch_size, mesh,
                                'config.train.unlabelled_batch_size')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       should_stop: Optional[Callable[[int], bool]] = None) -> dict:
  """Trains `config.train.steps` iterations, validating every `eval_every_steps` and at the end.

  Resumes from the newest complete checkpoint in `workdir/checkpoints`; SIGTERM, or `should_stop(step)`
  returning True after a step, saves one and returns `{'stopped_at_step': step, ...}`. Returns the last
  validation metrics otherwise.
  """
  os.makedirs(workdir, exist_ok=True)
  variant = config.loss.variant
  if variant not in train.VARIANTS:
    raise ValueError(f'config.loss.variant must be one of {train.VARIANTS}, got {variant!r}')
  model, prompt_ids = train.build_model(config)
  mesh = sharding.make_mesh(config.mesh)
  _check_batches(config, mesh, variant)
  splits, split, split_file = setup_data(config, workdir)
  batches = data_lib.load_train_batches(config.data, config.train, splits, split, config.seed,
                                        need_unlabelled=variant != 'supervised')
  val_images = infer.load_eval_images(data_lib.eval_pairs(splits, split, config.data.eval_split), config.data)
  logging.info('split %s: %d labelled, %d unlabelled, %d %s images; variant %s', split_file,
               len(split['labelled']), len(split['unlabelled']), len(val_images), config.data.eval_split, variant)

  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  params, batch_stats = train.init_variables(config, model, prompt_ids, init_key)
  fingerprint = checkpoints.tree_checksum(train.split_params(params)[1])
  total_steps = config.train.steps
  optimizer, schedules = train.make_optimizer(config.train, total_steps)
  state, shardings = train.create_sharded_train_state(params, batch_stats, optimizer, model.config.num_classes,
                                                      model.config.embed_dim, mesh, config.sharding.logical_rules)
  del params, batch_stats
  count = lambda tree: int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))
  logging.info('parameters: %s trainable, %s frozen; mesh %s', f'{count(state.trainable):,}',
               f'{count(state.frozen):,}', dict(mesh.shape))

  manager = checkpoints.TrainCheckpoints(os.path.join(workdir, 'checkpoints'), config.checkpoint.keep,
                                         config.checkpoint.async_save)
  start_step = manager.latest_step()
  if start_step is not None:
    if not config.checkpoint.resume:
      raise checkpoints.CheckpointError(
          f'{workdir} already holds checkpoints (step {start_step}) and config.checkpoint.resume is False')
    restored, _, meta = manager.restore(start_step, resumable(state))
    state = state.replace(step=restored['step'], trainable=restored['trainable'],
                          batch_stats=restored['batch_stats'], opt_state=restored['opt_state'],
                          bank=state.bank.replace(**restored['bank']))
    check_fingerprint(meta, fingerprint, f'checkpoint step {start_step}')
    if meta.get('variant', variant) != variant:
      raise checkpoints.CheckpointError(f'{workdir} holds a {meta["variant"]!r} run; config.loss.variant is '
                                        f'{variant!r} (use another --workdir)')
    step_key = jax.random.wrap_key_data(np.asarray(meta['rng_key_data'], np.uint32))
    logging.info('resumed from step %d', start_step)
  start_step = start_step or 0

  step_fn = train.make_train_step(model, config, prompt_ids, optimizer, schedules, mesh, shardings)
  window_fn = train.make_window_probs_fn(model, config, mesh, shardings)
  train_log, eval_log = JsonlWriter(workdir, 'train_metrics'), JsonlWriter(workdir, 'eval_metrics')
  select = config.eval.select_metric
  saved_step = start_step

  def save(step: int, extra: Optional[dict] = None) -> None:
    nonlocal saved_step
    if step != saved_step:
      manager.save(step, resumable(state), {'step': step},
                   checkpoint_meta(step, fingerprint, step_key, {'variant': variant, **(extra or {})}))
      saved_step = step

  last_eval: dict = {}
  images_per_step = config.train.labelled_batch_size + (config.train.unlabelled_batch_size
                                                        if variant != 'supervised' else 0)
  window_start, window_images, started = time.perf_counter(), 0, time.perf_counter()
  iterator = batches.iterate(start_step)
  try:
    with PreemptionSignal() as preemption:
      for step in range(start_step, total_steps):
        batch = sharding.shard_host_batch(next(iterator), mesh)
        state, step_metrics = step_fn(state, batch, step_key)
        window_images += images_per_step
        done = step + 1
        if done % config.train.log_every_steps == 0 or done == total_steps:
          record = {key: float(value) for key, value in jax.device_get(step_metrics).items()}
          elapsed = time.perf_counter() - window_start
          record.update(step=done, images_per_s=window_images / elapsed, wall_s=time.perf_counter() - started)
          train_log.write(record)
          logging.info('step %d/%d  loss %.4f  mask ratio %.3f  %.1f img/s', done, total_steps, record['loss'],
                       record.get('mask_ratio', float('nan')), record['images_per_s'])
          window_start, window_images = time.perf_counter(), 0
        if done % config.train.eval_every_steps == 0 or done == total_steps:
          last_eval = evaluate_state(window_fn, state, val_images, config)
          last_eval.update(step=done, split=config.data.eval_split, variant=variant)
          eval_log.write(last_eval)
          logging.info('%s after step %d:\n%s', config.data.eval_split, done,
                       metrics_lib.format_metrics_table(last_eval))
          if select not in last_eval:
            raise ValueError(f'config.eval.select_metric={select!r} is not a metric (have {sorted(last_eval)})')
          score = {select: last_eval[select]}
          manager.save_best(done, weights(state), last_eval[select],
                            checkpoint_meta(done, fingerprint, step_key, {'variant': variant, **score}))
          save(done, score)
          window_start = time.perf_counter()
        elif done % config.checkpoint.every_steps == 0:
          save(done)
        if stop_requested(done, total_steps, should_stop, preemption, manager):
          save(done)
          logging.warning('stopped at step %d of %d; rerun the same command to resume', done, total_steps)
          return {'stopped_at_step': done, **last_eval}
    if not last_eval:  # resumed from the final step: nothing left to train, report the state's metrics
      last_eval = evaluate_state(window_fn, state, val_images, config)
      last_eval.update(step=total_steps, split=config.data.eval_split, variant=variant)
  finally:
    manager.wait()  # a background save completes before the process may exit
  return last_eval


def evaluate_state(window_fn: Callable, state: train.TrainState, images, config) -> dict:
  return infer.evaluate(lambda windows: window_fn(state.params, state.batch_stats, windows), images, config)


def restore_weights(config: ml_collections.ConfigDict, workdir: str, name: str):
  """-> (model, params (frozen + trainable), batch_stats, meta, mesh, state shardings) of checkpoint `name`
  ('best' by `config.eval.select_metric` or 'last' = the newest step) in `workdir/checkpoints`, laid out on
  the mesh of `config.mesh`."""
  if name not in CHECKPOINT_NAMES:
    raise checkpoints.CheckpointError(f'no checkpoint {name!r}: --checkpoint must be one of {CHECKPOINT_NAMES}')
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(os.path.join(directory, 'steps')):
    raise checkpoints.CheckpointError(f'no checkpoints under {directory}: train first (--mode=train with '
                                      'the same --workdir)')
  model, prompt_ids = train.build_model(config)
  mesh = sharding.make_mesh(config.mesh)
  frozen, trainable, batch_stats = train.init_frozen_and_shapes(
      config, model, prompt_ids, jax.random.split(jax.random.key(config.seed))[0])
  num_classes, embed_dim = model.config.num_classes, model.config.embed_dim
  optimizer, _ = train.make_optimizer(config.train, 1)  # the optimizer state's structure only
  abstract = jax.eval_shape(lambda p, b: train.create_train_state(p, b, optimizer, num_classes, embed_dim),
                            {**frozen, **trainable}, batch_stats)
  shardings = train.state_shardings(abstract, mesh, config.sharding.logical_rules)
  target = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                        abstract, shardings)
  manager = checkpoints.TrainCheckpoints(directory, config.checkpoint.keep, async_save=False)
  try:
    if name == 'best':
      restored, meta = manager.restore_best(weights(target))
    else:
      step = manager.latest_step()
      if step is None:
        raise checkpoints.CheckpointError(f'no complete checkpoint under {directory}/steps')
      state, _, meta = manager.restore(step, resumable(target))
      restored = {'params': state['trainable'], 'batch_stats': state['batch_stats']}
  finally:
    manager.close()
  check_fingerprint(meta, checkpoints.tree_checksum(frozen), f'checkpoint {name!r} in {directory}')
  params = {**sharding.place_tree(frozen, shardings.frozen), **restored['params']}
  logging.info('restored checkpoint %r (step %s)', name, meta.get('step'))
  return model, params, restored['batch_stats'], meta, mesh, shardings


def restore(config: ml_collections.ConfigDict, workdir: str, name: str):
  """-> (model, probs_fn `windows uint8 [N, S, S, 3] -> softmax`, meta) of checkpoint `name`."""
  model, params, batch_stats, meta, mesh, shardings = restore_weights(config, workdir, name)
  window_fn = train.make_window_probs_fn(model, config, mesh, shardings)
  return model, lambda windows: window_fn(params, batch_stats, windows), meta
