"""Grain input pipelines over the converted record files (`protoseg_jax.data.records`).

Training: the split's global order is a seeded per-epoch shuffle of all records (Grain's `index_shuffle`,
a fresh permutation every epoch), cut to whole global batches (the last incomplete batch of an epoch is
dropped) and repeated forever. Global batch t is positions [t G, (t + 1) G) of that stream; host p of P
reads rows [p b, (p + 1) b) of it (b = G / P), so the union of the hosts' batch t is exactly the
single-host batch t, in order, whatever the number of hosts. Host-side augmentation, when on, is seeded by
the global position, so it does not depend on the number of hosts or workers either.

Evaluation: host p reads records p, p + P, p + 2P, ... (each record exactly once across hosts), unshuffled,
unaugmented.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import grain
import ml_collections
import numpy as np

from protoseg_jax.data import records as records_lib
from protoseg_jax.data.bcss import DatasetError


# --- host-side augmentation (the default is on the device: protoseg_jax.augment) -------------------------

def host_flip_rotate(image: np.ndarray, rng: np.random.Generator, hflip: bool = True, vflip: bool = True,
                     rot90: bool = True) -> np.ndarray:
  """`[H, W, C]` -> same: horizontal flip (p 0.5), vertical flip (p 0.5), then rot90 by k ~ U{0..3}.

  The same transformations, in the same order, as the on-device `augment.flip_rotate`.
  """
  if hflip and rng.random() < 0.5:
    image = image[:, ::-1]
  if vflip and rng.random() < 0.5:
    image = image[::-1]
  if rot90:
    if image.shape[0] != image.shape[1]:
      raise ValueError(f'rot90 augmentation needs square tiles, got {image.shape[:2]} (config.data.augment)')
    image = np.rot90(image, int(rng.integers(0, 4)), axes=(0, 1))
  return np.ascontiguousarray(image)


def host_normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 `[..., 3]` -> float32 `(x / 255 - mean) / std` (as `augment.normalize`), fused as `x a + c`."""
  std = np.asarray(std, np.float64)
  scale = (1.0 / (255.0 * std)).astype(np.float32)
  offset = (-np.asarray(mean, np.float64) / std).astype(np.float32)
  result = np.multiply(image, scale, dtype=np.float32)
  result += offset
  return result


@dataclasses.dataclass(frozen=True)
class HostAugment:
  """Grain random map: flips / rot90 then normalisation of `element['images']` (uint8 -> float32)."""

  hflip: bool
  vflip: bool
  rot90: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict) -> 'HostAugment':
    augment = data_config.augment
    return cls(bool(augment.hflip), bool(augment.vflip), bool(augment.rot90), tuple(data_config.mean),
               tuple(data_config.std))

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    image = host_flip_rotate(element['images'], rng, self.hflip, self.vflip, self.rot90)
    return {**element, 'images': host_normalize(image, self.mean, self.std)}


# --- decoding --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeTile:
  """Grain map: `(where, Example bytes)` -> `{'images' [H, W, 3] uint8, 'labels' [C] int32}`, plus
  `'masks' [H, W] uint8` and `'names'` when `with_mask` (val/test)."""

  num_classes: int
  image_size: int
  with_mask: bool = False

  def __call__(self, item: tuple[str, bytes]) -> dict:
    where, serialized = item
    tile = records_lib.decode_tile(serialized, self.num_classes, where)
    where = f'{where} ({tile.name})'
    image = records_lib.decode_image(tile.image_bytes, where)
    if image.shape[:2] != (self.image_size, self.image_size):
      raise DatasetError(f'{where}: tile is {image.shape[1]}x{image.shape[0]}, expected '
                         f'{self.image_size}x{self.image_size} (config.data.image_size)')
    element = {'images': image, 'labels': tile.label}
    if self.with_mask:
      if tile.mask_bytes is None:
        raise DatasetError(f'{where}: record has no mask (a training split read as val/test?)')
      mask = records_lib.decode_mask(tile.mask_bytes, self.num_classes + 1, where)
      if mask.shape != image.shape[:2]:
        raise DatasetError(f'{where}: mask is {mask.shape[1]}x{mask.shape[0]}, its image '
                           f'{image.shape[1]}x{image.shape[0]}')
      element.update(masks=mask, names=tile.name)
    return element


def check_split(split: records_lib.SplitRecords, num_classes: int, image_size: int) -> None:
  """The manifest agrees with the config: class count and tile size (errors name the manifest and key)."""
  where = split.root / records_lib.manifest_name(split.split)
  if len(split.class_names) != num_classes:
    raise DatasetError(f'{where}: converted with {len(split.class_names)} classes {list(split.class_names)}, '
                       f'config.data.class_names has {num_classes}')
  if tuple(split.image_shape[:2]) != (image_size, image_size):
    raise DatasetError(f'{where}: tiles are {split.image_shape[1]}x{split.image_shape[0]}, expected '
                       f'{image_size}x{image_size} (config.data.image_size)')


# --- sharding --------------------------------------------------------------------------------------------

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


def _uint32_seed(seed: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed % 2 ** 32, stream]).generate_state(1)[0])


def _ensure_flags_parsed() -> None:
  # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) nothing parsed them.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def train_dataset(split: records_lib.SplitRecords, data_config: ml_collections.ConfigDict,
                  global_batch_size: int, seed: int, process_index: int, process_count: int,
                  start_step: int = 0) -> tuple[grain.IterDataset, int]:
  """-> (host-local batch `IterDataset` from global step `start_step` on, steps per epoch).

  Elements: `{'images': [b, H, W, 3] uint8 (float32 normalised with augment_on='host'), 'labels': [b, C]
  int32}`.
  """
  num_classes = len(data_config.class_names)
  check_split(split, num_classes, data_config.image_size)
  steps_per_epoch = split.num_examples // global_batch_size
  if steps_per_epoch == 0:
    raise DatasetError(f'{split.root / records_lib.manifest_name(split.split)}: the {split.split} split has '
                       f'{split.num_examples} tiles, fewer than one batch of {global_batch_size} '
                       f'(config.train.batch_size)')
  host_batch = global_batch_size // process_count
  source = records_lib.ArrayRecordSource(split)
  stream = (grain.MapDataset.source(source)
            .shuffle(seed=_uint32_seed(seed, 0))[:steps_per_epoch * global_batch_size]  # per-epoch shuffle
            .repeat()
            .map(DecodeTile(num_classes, data_config.image_size)))
  if data_config.augment_on == 'host':
    stream = stream.random_map(HostAugment.from_config(data_config), seed=_uint32_seed(seed, 1))
  # Batches are formed before the hand-over to threads / worker processes, so a batch is the same rows
  # whatever `config.data.grain.worker_count` is (workers take whole batches in turn).
  batches = HostRows(stream, host_batch, process_index, process_count).batch(host_batch, drop_remainder=True)
  options = data_config.grain
  dataset = batches[start_step:].to_iter_dataset(grain.ReadOptions(
      num_threads=options.read_threads, prefetch_buffer_size=options.prefetch_buffer_size))
  if options.worker_count > 0:
    _ensure_flags_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=options.worker_count, per_worker_buffer_size=options.worker_buffer_size))
  return dataset, steps_per_epoch


def eval_dataset(split: records_lib.SplitRecords, num_classes: int, image_size: int, process_index: int,
                 process_count: int, read_threads: int) -> tuple[grain.IterDataset, int]:
  """-> (this host's decoded examples, unbatched and in record order, their count).

  Host p reads records p, p + P, ...; elements as `DecodeTile(with_mask=True)`.
  """
  check_split(split, num_classes, image_size)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} outside 0..{process_count - 1}')
  source = records_lib.ArrayRecordSource(split)
  host = grain.MapDataset.source(source)[process_index::process_count]
  dataset = host.map(DecodeTile(num_classes, image_size, with_mask=True)).to_iter_dataset(
      grain.ReadOptions(num_threads=max(read_threads, 1), prefetch_buffer_size=max(4 * read_threads, 8)))
  return dataset, len(host)


class RecordTrainIterator:
  """Host-local training batches over records, with a JSON-serialisable, restorable state.

  The state is `{'step', 'start_step', 'worker_count', 'grain'}`: Grain's own iterator state relative to
  the dataset started at `start_step`. Restoring with a different `config.data.grain.worker_count` (Grain's
  state is per worker) restarts the deterministic stream at `step` instead, which yields the same batches.
  """

  def __init__(self, build, worker_count: int, state: Optional[dict] = None):
    self._build = build            # start_step -> IterDataset
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

