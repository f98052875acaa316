"""Metrics a user can watch: JSONL files, TensorBoard event files (tensorboardX, no TensorFlow), a progress
line.

Only the primary process writes (the others' writers are no-ops).
  <workdir>/train_metrics.jsonl, <workdir>/eval_metrics.jsonl   one JSON object per line (pandas-readable)
  <workdir>/tensorboard/events.out.tfevents.*                     `tensorboard --logdir <workdir>/tensorboard`
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping, Optional

import jax


def _is_primary() -> bool:
  return jax.process_index() == 0


class MetricWriter:
  """Scalars to `<workdir>/<name>.jsonl` and, with `tensorboard`, to TensorBoard as `<name>/key`."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.workdir = workdir
    self.enabled = _is_primary()
    self._tensorboard = None
    if self.enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      except ImportError:  # a declared dependency; a broken environment still trains and logs JSONL
        logging.warning('tensorboardX is not importable: no TensorBoard event files (JSONL logs only)')
      else:
        self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, name: str, step: int, record: Mapping) -> None:
    if not self.enabled:
      return
    with open(os.path.join(self.workdir, f'{name}.jsonl'), 'a') as handle:
      handle.write(json.dumps(dict(record)) + '\n')
    if self._tensorboard is not None:
      for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
          self._tensorboard.add_scalar(f'{name}/{key}', float(value), step)
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


class Progress:
  """`step 160/288 (55.6 %)  loss 1.1397  lr 2.24e-03  26.7 img/s  ETA 4m12s` lines from the log windows."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.start_step = total_steps, start_step
    self._started = time.perf_counter()

  def line(self, step: int, loss: float, learning_rate: Optional[float], images_per_s: float) -> str:
    elapsed = time.perf_counter() - self._started
    done = step - self.start_step
    eta = elapsed / done * (self.total - step) if done > 0 else float('nan')
    lr = f'  lr {learning_rate:.3g}' if learning_rate is not None else ''
    return (f'step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f} %)  loss {loss:.4f}{lr}  '
            f'{images_per_s:.1f} img/s  ETA {format_duration(eta)}')
