"""Named parameter checkpoints (`last`, `best`) with Orbax, replaced atomically.

A save writes `<name>.tmp` completely, then swaps it in by renames, so an interrupted save leaves the
previous `<name>` (or, mid-swap, `<name>.old`) intact; `restore` falls back to `<name>.old`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing or does not fit the model; the message names the path or parameter."""


def _describe(tree: Any) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


class ParamsCheckpoints:
  """Saves and restores parameter pytrees under `directory/<name>` with a `meta.json` beside them."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    self._checkpointer = ocp.StandardCheckpointer()

  def path(self, name: str) -> str:
    return os.path.join(self.directory, name)

  def save(self, name: str, tree: Any, meta: Optional[dict] = None) -> None:
    if jax.process_index() != 0:
      return
    final, temporary, old = self.path(name), self.path(name + '.tmp'), self.path(name + '.old')
    shutil.rmtree(temporary, ignore_errors=True)
    self._checkpointer.save(os.path.join(temporary, 'params'), tree)
    self._checkpointer.wait_until_finished()
    with open(os.path.join(temporary, 'meta.json'), 'w') as handle:
      json.dump(meta or {}, handle)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
      os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)

  def exists(self, name: str) -> bool:
    return any(os.path.isdir(os.path.join(self.path(n), 'params')) for n in (name, name + '.old'))

  def restore(self, name: str, target: Any) -> tuple[Any, dict]:
    """Restores onto the structure and shapes of `target`; a mismatch names the first differing key."""
    for candidate in (self.path(name), self.path(name + '.old')):
      if os.path.isdir(os.path.join(candidate, 'params')):
        break
    else:
      raise CheckpointError(f'no checkpoint {name!r} in {self.directory}')
    if candidate.endswith('.old'):
      logging.warning('checkpoint %s was being replaced when the run stopped; using %s', name, candidate)
    saved = self._checkpointer.metadata(os.path.join(candidate, 'params'))
    saved = getattr(saved, 'item_metadata', saved)
    saved_shapes, wanted_shapes = _describe(saved), _describe(target)
    for key in sorted(set(saved_shapes) | set(wanted_shapes)):
      if key not in saved_shapes:
        raise CheckpointError(f'{candidate}: parameter {key} is missing from the checkpoint')
      if key not in wanted_shapes:
        raise CheckpointError(f'{candidate}: parameter {key} is in the checkpoint but not in the model')
      if saved_shapes[key] != wanted_shapes[key]:
        raise CheckpointError(f'{candidate}: parameter {key} has shape {saved_shapes[key]} in the '
                              f'checkpoint but {wanted_shapes[key]} in the model')
    restored = self._checkpointer.restore(os.path.join(candidate, 'params'), target)
    with open(os.path.join(candidate, 'meta.json')) as handle:
      meta = json.load(handle)
    return restored, meta
