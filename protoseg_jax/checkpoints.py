"""Orbax checkpoints of every method: resumable training state and best-by-metric weights.

`TrainCheckpoints`: an Orbax `CheckpointManager` under `<dir>/steps/<step>/` holding the train state (step,
trainable params, extra state, optimizer state), the data iterator state and a meta JSON (RNG key,
frozen-tower fingerprint, the run's config, metrics), saved every N steps, at validations and on preemption,
keeping the last K; and a second manager under `<dir>/best/<step>/` holding the weights (trainable params and
extra state) of the two best validation scores. Orbax writes each step to a temporary directory and renames
it when complete, so an interrupted save never replaces a good one; leftovers are reported and removed when
the manager opens.

A checkpoint that cannot be read (a truncated array file, garbage metadata, a missing item) is moved aside to
`<dir>/corrupt/` — never deleted — with a warning naming it, and the next intact one is used: training
resumes from the newest intact step, eval / predict / export fall back from a corrupt `best` to the next
best, then to the newest intact step. A checkpoint that reads fine but does not fit the model is a
`CheckpointError` naming the first differing parameter (nothing is moved).
"""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from protoseg_jax.errors import CheckpointError

KEEP_BEST = 2


def _describe(tree: Any) -> dict[str, tuple]:
  """`{'a/b/0': shape}`: paths spelled the same for dicts, dataclasses, named tuples and tuples."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(np.shape(leaf))
          for path, leaf in flat}


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
  return float(sum(np.abs(np.asarray(jax.device_get(leaf), np.float64)).sum()
                   for leaf in jax.tree.leaves(tree)))


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


class TrainCheckpoints:
  """Resumable training checkpoints (last `keep` steps) plus the best-by-metric weights."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._keep, self._async = max(keep, 1), async_save
    self._steps_dir = os.path.join(self.directory, 'steps')
    self._best_dir = os.path.join(self.directory, 'best')
    for path in (self._steps_dir, self._best_dir):
      os.makedirs(path, exist_ok=True)
      _report_interrupted_saves(path)
    self._open()

  def _open(self) -> None:
    json_handler = ocp.JsonCheckpointHandler
    self._steps = ocp.CheckpointManager(self._steps_dir, item_handlers={
        'state': ocp.StandardCheckpointHandler(), 'data': json_handler(), 'meta': json_handler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, enable_async_checkpointing=self._async, create=True,
            cleanup_tmp_directories=True))
    self._best = ocp.CheckpointManager(self._best_dir, item_handlers={
        'weights': ocp.StandardCheckpointHandler(), 'meta': json_handler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=KEEP_BEST, best_fn=lambda metrics: metrics['score'], best_mode='max',
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=self._async, create=True,
            cleanup_tmp_directories=True))

  # --- listing ---------------------------------------------------------------------------------------
  def latest_step(self) -> Optional[int]:
    return self._steps.latest_step()

  def all_steps(self) -> Sequence[int]:
    return self._steps.all_steps()

  def best_step(self) -> Optional[int]:
    return self._best.best_step()

  def best_score(self) -> Optional[float]:
    """The score of `best_step()` (None when there is no best checkpoint)."""
    self.wait()
    step = self._best.best_step()
    metrics = self._best.metrics(step) if step is not None else None
    return float(metrics['score']) if metrics and 'score' in metrics else None

  def best_steps(self) -> list[int]:
    """Kept best checkpoints, best score first."""
    scored = []
    for step in self._best.all_steps():
      metrics = self._best.metrics(step)
      scored.append((-(metrics or {}).get('score', float('-inf')), -step, step))
    best = self._best.best_step()
    ordered = [step for _, _, step in sorted(scored)]
    if best in ordered:
      ordered.remove(best)
      ordered.insert(0, best)
    return ordered

  # --- saving --------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Saves the full train state at `step` (asynchronously when enabled; returns once copied to host)."""
    self._steps.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def save_best(self, step: int, weights: Any, score: float, meta: dict) -> None:
    """Offers `weights` as one of the best; kept only if `score` beats a kept one. A best checkpoint of the
    same step already on disk (a run resumed from an earlier step retraces the same, deterministic steps)
    is kept as it is."""
    if step in self._best.all_steps():
      logging.info('best checkpoint of step %d already kept', step)
      return
    self._best.save(step, args=ocp.args.Composite(weights=ocp.args.StandardSave(weights),
                                                  meta=ocp.args.JsonSave({**meta, 'score': score})),
                    metrics={'score': float(score)}, force=True)

  def reached_preemption(self, step: int) -> bool:
    """True on every host once any host got the preemption notice (multi-host JAX), else False."""
    return self._steps.reached_preemption(step)

  # --- restoring -----------------------------------------------------------------------------------
  def _quarantine(self, kind: str, step: int, error: BaseException) -> None:
    """Moves `<kind>/<step>` to `corrupt/<kind>-<step>-<time>` (primary process) and reopens the managers."""
    self.wait()
    source = os.path.join(self.directory, kind, str(step))
    target = os.path.join(self.directory, 'corrupt', f'{kind}-{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    logging.warning('checkpoint %s is unreadable (%s): moved to %s; using the next intact one', source,
                    _first_line(error), target)
    if jax.process_index() == 0 and os.path.isdir(source):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'protoseg_quarantine_{kind}_{step}')
    self.close()
    self._open()

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict, dict]:
    """-> (state placed like `target_state`, data iterator state, meta) of step `step`; checks names and
    shapes first. Raises `CheckpointError` if it does not fit, other exceptions if it is unreadable."""
    where = os.path.join(self._steps.directory, str(step))
    saved = self._steps.item_metadata(step)
    saved_state = saved['state'] if saved is not None and 'state' in saved else None
    if saved_state is None:
      raise FileNotFoundError(f'{where}: no state item')
    check_structure(getattr(saved_state, 'tree', saved_state), target_state, where)
    restored = self._steps.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target_state)), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    if not isinstance(restored['meta'], dict) or not isinstance(restored['data'], dict):
      raise ValueError(f'{where}: meta or data item is not a JSON object')
    return restored['state'], restored['data'], restored['meta']

  def restore_latest(self, target_state: Any) -> Optional[tuple[int, Any, dict, dict]]:
    """The newest intact step: -> (step, state, data state, meta), or None when there is none. Unreadable
    steps on the way are moved aside (see the module docstring)."""
    while True:
      steps = sorted(self._steps.all_steps(), reverse=True)
      if not steps:
        return None
      step = steps[0]
      try:
        return (step, *self.restore(step, target_state))
      except CheckpointError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        self._quarantine('steps', step, error)

  def restore_step(self, step: int, target_state: Any) -> tuple[Any, dict, dict]:
    """A step the user named (`--checkpoint=<step>`); `CheckpointError` naming it if absent or unreadable."""
    steps = sorted(self._steps.all_steps())
    if step not in steps:
      raise CheckpointError(f'no checkpoint step {step} under {self._steps_dir} (kept steps: '
                            f'{", ".join(map(str, steps)) or "none"})')
    try:
      return self.restore(step, target_state)
    except CheckpointError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      self._quarantine('steps', step, error)
      raise CheckpointError(f'checkpoint step {step} is unreadable ({_first_line(error)}); moved to '
                            f'{os.path.join(self.directory, "corrupt")}') from None

  def _restore_best_step(self, step: int, target_weights: Any) -> tuple[Any, dict]:
    where = os.path.join(self._best.directory, str(step))
    saved = self._best.item_metadata(step)
    saved_weights = saved['weights'] if saved is not None and 'weights' in saved else None
    if saved_weights is None:
      raise FileNotFoundError(f'{where}: no weights item')
    check_structure(getattr(saved_weights, 'tree', saved_weights), target_weights, where)
    restored = self._best.restore(step, args=ocp.args.Composite(
        weights=ocp.args.StandardRestore(_abstract(target_weights)), meta=ocp.args.JsonRestore()))
    if not isinstance(restored['meta'], dict):
      raise ValueError(f'{where}: meta item is not a JSON object')
    return restored['weights'], restored['meta']

  def restore_best(self, target_weights: Any) -> Optional[tuple[Any, dict]]:
    """The best intact kept weights -> (weights, meta), or None when no best checkpoint is readable."""
    while True:
      steps = self.best_steps()
      if not steps:
        return None
      try:
        return self._restore_best_step(steps[0], target_weights)
      except CheckpointError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        self._quarantine('best', steps[0], error)

  def wait(self) -> None:
    self._steps.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._steps.close()
    self._best.close()
