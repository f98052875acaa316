"""The one training-input builder of every method: Grain datasets over random-access sources.

Two shapes of input, both restartable at any global step and identical whatever the number of hosts,
threads or worker processes:

* `element_batches`: a source of examples (decoded tiles from a folder, an in-memory cache or ArrayRecord
  shards) -> per-epoch permutation (`EpochOrder`: NumPy `default_rng([seed, epoch])`, a fresh order every
  epoch, a pure function of (seed, epoch)) -> this host's rows of each global batch (`HostRows`) -> decode /
  host transforms -> batches, read by Grain threads (and optionally worker processes) ahead of the device.
  The last incomplete batch of an epoch is dropped or kept ('keep': padded to full size with `valid=False`
  rows, so the step keeps one compiled shape).
* `step_batches`: a pure function `step -> batch` (a method that samples its own batches, e.g. MPAMatch's
  labelled + unlabelled windows) read ahead by Grain threads.

`TrainIterator` wraps either with a JSON-serialisable state for checkpoints.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Optional, Sequence

import grain
import ml_collections
import numpy as np

from protoseg_jax.errors import DatasetError

LAST_BATCH = ('drop', 'keep')


def steps_per_epoch(num_examples: int, global_batch: int, last_batch: str) -> int:
  """Global steps of one epoch: whole batches ('drop') or every example seen once ('keep')."""
  if last_batch not in LAST_BATCH:
    raise ValueError(f'config.data.last_partial_batch must be one of {LAST_BATCH}, got {last_batch!r}')
  return -(-num_examples // global_batch) if last_batch == 'keep' else num_examples // global_batch


class ListSource:
  """A Grain random-access source over a Python sequence, with a per-item loader (e.g. a PNG decoder)."""

  def __init__(self, items: Sequence[Any], load: Callable[[Any], Any] = lambda item: item):
    self._items = list(items)
    self._load = load

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int):
    return self._load(self._items[index])


class EpochOrder(grain.MapDataset):
  """Epoch after epoch of a seeded permutation of the parent: element `e * per_epoch + j` is
  `parent[perm_e[j]]` with `perm_e = default_rng([seed, e]).permutation(n)`.

  `per_epoch` = steps per epoch x global batch; positions `j >= n` (the padding of a kept last batch) repeat
  `perm_e[j - n]` and are flagged `valid = False`. Elements are `(parent element, valid)`.
  """

  def __init__(self, parent: grain.MapDataset, seed: int, per_epoch: int):
    super().__init__(parent)
    self._seed, self._per_epoch, self._count = seed, per_epoch, len(parent)
    if self._count == 0:
      raise DatasetError('the training split is empty')

  def __len__(self) -> int:
    return sys.maxsize

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._count)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(int(index), self._per_epoch)
    valid = position < self._count
    return self._parent[int(self._permutation(epoch)[position % self._count])], valid

  def __str__(self) -> str:
    return f'EpochOrder(seed={self._seed}, per_epoch={self._per_epoch})'


class HostRows(grain.MapDataset):
  """Host `process_index`'s rows of a global batch stream: its element i is parent element
  `(i // b) * G + process_index * b + i % b` with b = `host_batch`, G = b * `process_count`."""

  def __init__(self, parent: grain.MapDataset, host_batch: int, process_index: int, process_count: int):
    super().__init__(parent)
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} outside 0..{process_count - 1}')
    self._host_batch = host_batch
    self._process_index = process_index
    self._process_count = process_count
    self._length = len(parent) // process_count

  def __len__(self) -> int:
    return self._length

  def _parent_index(self, index: int) -> int:
    step, row = divmod(index, self._host_batch)
    return (step * self._process_count + self._process_index) * self._host_batch + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._parent_index(index)]

  def __str__(self) -> str:
    return f'HostRows(b={self._host_batch}, process {self._process_index} of {self._process_count})'


class StepSource:
  """Random-access source whose element t is `batch_fn(t)` (t = global step)."""

  def __init__(self, batch_fn: Callable[[int], dict]):
    self._batch_fn = batch_fn

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> dict:
    return self._batch_fn(int(index))


def host_batch_size(global_batch: int, process_count: int, config_key: str) -> int:
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(f'{config_key}={global_batch} must be a positive multiple of the number of hosts '
                     f'({process_count}): each host loads {config_key} / process_count examples')
  return global_batch // process_count


def _with_valid(decode: Callable[[Any], dict]) -> Callable[[tuple], dict]:
  def apply(item: tuple) -> dict:
    element, valid = item
    return {**decode(element), 'valid': np.bool_(valid)}
  return apply


def _read_options(options: ml_collections.ConfigDict) -> grain.ReadOptions:
  threads = max(int(options.read_threads), 1)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(int(options.prefetch_buffer_size),
                                                                          threads))


def _ensure_flags_parsed() -> None:
  # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) nothing parsed them.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _prefetch(dataset: grain.IterDataset, options: ml_collections.ConfigDict) -> grain.IterDataset:
  if int(options.worker_count) > 0:
    _ensure_flags_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(options.worker_count), per_worker_buffer_size=int(options.worker_buffer_size)))
  return dataset


def element_batches(source: Any, decode: Callable[[Any], dict], *, seed: int, global_batch: int,
                    last_batch: str, process_index: int, process_count: int,
                    options: ml_collections.ConfigDict, start_step: int = 0,
                    host_transform: Optional[Callable[[dict, np.random.Generator], dict]] = None,
                    transform_seed: int = 0) -> grain.IterDataset:
  """This host's training batches from global step `start_step` on (see the module docstring).

  `source[i]` gives example i (anything `decode` accepts; decoding happens on Grain's threads), `decode`
  returns a dict of arrays; batches stack them and add `valid` `[b]` bool. `host_transform(element, rng)`,
  when given, runs per element with an rng seeded by (transform_seed, global position), so it does not
  depend on the number of hosts or workers. `options`: `config.data.grain` (read_threads,
  prefetch_buffer_size, worker_count, worker_buffer_size).
  """
  epoch_steps = steps_per_epoch(len(source), global_batch, last_batch)
  if len(source) and not epoch_steps:  # else EpochOrder would divide by a 0-row epoch on the first read
    raise DatasetError(f'the training split has {len(source)} examples, fewer than one batch of '
                       f'{global_batch} (config.train.batch_size)')
  per_epoch = epoch_steps * global_batch
  host_batch = host_batch_size(global_batch, process_count, 'config.train.batch_size')
  stream = EpochOrder(grain.MapDataset.source(source), seed, per_epoch).map(_with_valid(decode))
  if host_transform is not None:
    stream = stream.random_map(host_transform, seed=transform_seed)
  # Batches are formed before the hand-over to threads / worker processes, so a batch is the same rows
  # whatever the thread or worker count is (workers take whole batches in turn).
  batches = HostRows(stream, host_batch, process_index, process_count).batch(host_batch, drop_remainder=True)
  return _prefetch(batches[start_step:].to_iter_dataset(_read_options(options)), options)


def step_batches(batch_fn: Callable[[int], dict], options: ml_collections.ConfigDict,
                 start_step: int = 0) -> grain.IterDataset:
  """Batches `batch_fn(start_step), batch_fn(start_step + 1), ...` computed ahead on Grain's threads."""
  return _prefetch(grain.MapDataset.source(StepSource(batch_fn))[start_step:].to_iter_dataset(
      _read_options(options)), options)


class TrainIterator:
  """Host-local training batches with a JSON-serialisable, restorable state.

  `build(start_step) -> IterDataset`. The state is `{'step', 'start_step', 'worker_count', 'grain'}`:
  Grain's own iterator state relative to the dataset started at `start_step`. Restoring with a different
  worker count (Grain's state is per worker), or from a state holding only `step` (multi-host checkpoints
  keep one JSON for all hosts), restarts the deterministic stream at `step`, which yields the same batches.
  """

  def __init__(self, build: Callable[[int], grain.IterDataset], worker_count: int,
               state: Optional[dict] = None):
    self._build = build
    self._worker_count = worker_count
    self._iterator: Any = None
    self.set_state(state or {'step': 0})

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or not isinstance(state.get('step'), int) or state['step'] < 0:
      raise ValueError(f'data iterator state must be a dict with a non-negative int "step", got {state!r}')
    self.close()
    step = state['step']
    if 'grain' in state and state.get('worker_count') == self._worker_count:
      self._start_step = int(state['start_step'])
      self._iterator = iter(self._build(self._start_step))
      self._iterator.set_state(state['grain'])
    else:
      self._start_step = step
      self._iterator = iter(self._build(step))
    self._step = step

  def get_state(self) -> dict:
    return {'step': self._step, 'start_step': self._start_step, 'worker_count': self._worker_count,
            'grain': self._iterator.get_state()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    self._step += 1
    return batch

  def close(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, 'close'):
      self._iterator.close()
    self._iterator = None

