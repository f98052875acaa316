"""Orbax checkpoints: resumable training state and best-by-metric parameters (DualProtoSeg and MPAMatch).

`TrainCheckpoints` (the training loop's): an Orbax `CheckpointManager` under `<dir>/steps/<step>/` holding the
train state (step, trainable params, optimizer state), the data iterator state, the RNG key and a meta JSON,
saved every N steps and on preemption, keeping the last K; and a second manager under `<dir>/best/<step>/`
holding the trainable params of the best validation score. Orbax writes each step to a temporary directory
and renames it when complete, so an interrupted save never replaces a good one; leftovers are reported and
removed when the manager opens.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing or does not fit the model; the message names the path or parameter."""


def _key_name(key: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _describe(tree: Any) -> dict[str, tuple]:
  """`{'a/b/0': shape}`: paths spelled the same for dicts, dataclasses, named tuples and tuples."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(key) for key in path): tuple(np.shape(leaf)) for path, leaf in flat}


def check_structure(saved: Any, wanted: Any, where: str) -> None:
  """Raises `CheckpointError` naming the first parameter whose presence or shape differs."""
  saved_shapes, wanted_shapes = _describe(saved), _describe(wanted)
  for key in sorted(set(saved_shapes) | set(wanted_shapes)):
    if key not in saved_shapes:
      raise CheckpointError(f'{where}: parameter {key} is missing from the checkpoint')
    if key not in wanted_shapes:
      raise CheckpointError(f'{where}: parameter {key} is in the checkpoint but not in the model')
    if saved_shapes[key] != wanted_shapes[key]:
      raise CheckpointError(f'{where}: parameter {key} has shape {saved_shapes[key]} in the '
                            f'checkpoint but {wanted_shapes[key]} in the model')


def _report_interrupted_saves(directory: str) -> list[str]:
  """Logs (and returns) the temporary directories an interrupted save left behind; Orbax removes them."""
  leftovers = sorted(glob.glob(os.path.join(directory, '*.orbax-checkpoint-tmp*')))
  for path in leftovers:
    logging.warning('ignoring an interrupted checkpoint save: %s (it will be removed)', path)
  return leftovers


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding targets for a restore (the arrays' current placement, so a restore can reshard)."""
  def leaf(x):
    sharding = getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def tree_checksum(tree: Any) -> float:
  """A cheap checksum (sum of |values| in float64) of a parameter tree, e.g. the frozen towers: stored in
  checkpoint meta so that a restore onto different towers is refused by the caller."""
  return float(sum(np.abs(np.asarray(jax.device_get(leaf), np.float64)).sum() for leaf in jax.tree.leaves(tree)))


class TrainCheckpoints:
  """Resumable training checkpoints (last `keep` steps) plus the best-by-metric trainable params.

  The frozen towers are not saved (they come from `config.backbone` and the seed); a fingerprint of them
  goes into the meta so that a restore onto different towers is refused by the caller.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    steps_dir, best_dir = os.path.join(self.directory, 'steps'), os.path.join(self.directory, 'best')
    for path in (steps_dir, best_dir):
      os.makedirs(path, exist_ok=True)
      _report_interrupted_saves(path)
    json_handler = ocp.JsonCheckpointHandler
    self._steps = ocp.CheckpointManager(steps_dir, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'data': json_handler(), 'meta': json_handler()},
        options=ocp.CheckpointManagerOptions(
        max_to_keep=max(keep, 1), enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True))
    self._best = ocp.CheckpointManager(best_dir, item_handlers={
        'params': ocp.StandardCheckpointHandler(), 'meta': json_handler()},
        options=ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda metrics: metrics['score'], best_mode='max',
        keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True))

  def latest_step(self) -> Optional[int]:
    return self._steps.latest_step()

  def best_step(self) -> Optional[int]:
    return self._best.best_step()

  def all_steps(self) -> Sequence[int]:
    return self._steps.all_steps()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Saves the full train state at `step` (asynchronously when enabled; returns once copied to host)."""
    self._steps.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def save_best(self, step: int, params: Any, score: float, meta: dict) -> None:
    """Offers `params` as the best; kept only if `score` beats the kept one."""
    self._best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                  meta=ocp.args.JsonSave({**meta, 'score': score})),
                    metrics={'score': float(score)}, force=True)

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got the preemption notice (multi-host JAX), else False."""
    return self._steps.reached_preemption(step)

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict, dict]:
    """-> (state placed like `target_state`, data iterator state, meta); checks names and shapes first."""
    where = os.path.join(self._steps.directory, str(step))
    saved = self._steps.item_metadata(step)
    saved_state = saved['state'] if saved is not None and 'state' in saved else None
    if saved_state is not None:
      check_structure(getattr(saved_state, 'tree', saved_state), target_state, where)
    restored = self._steps.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target_state)), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored['state'], restored['data'], restored['meta']

  def restore_best(self, target_params: Any) -> tuple[Any, dict]:
    step = self._best.best_step()
    if step is None:
      raise CheckpointError(f'no best checkpoint under {self._best.directory}')
    where = os.path.join(self._best.directory, str(step))
    saved = self._best.item_metadata(step)
    if saved is not None and 'params' in saved and saved['params'] is not None:
      check_structure(getattr(saved['params'], 'tree', saved['params']), target_params, where)
    restored = self._best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(target_params)), meta=ocp.args.JsonRestore()))
    return restored['params'], restored['meta']

  def wait(self) -> None:
    self._steps.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._steps.close()
    self._best.close()
