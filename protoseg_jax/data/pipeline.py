"""Host-side input: training batches and evaluation batches from a BCSS-WSSS folder or converted records.

Two sources behind one interface (`make_train_source`, `make_eval_source`):
  kind 'folder' / 'synthetic'   PNG files decoded in a thread pool (`TrainBatches`, `EvalSet`)
  kind 'records'                Grain over ArrayRecord shards (`grain_pipeline`), written by
                                `python -m protoseg_jax.data.convert`
Both ship uint8 tiles by default; augmentation and normalisation happen on the device
(`protoseg_jax.augment`) unless `config.data.augment_on='host'`. Training batches are a pure function of
(seed, global step): host p of P gets rows [p b, (p + 1) b) of global batch t (b = G / P), and a run
resumed from `iterator.get_state()` sees exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from typing import Callable, Iterator, Optional, Sequence

import ml_collections
import numpy as np
from etils import epath

from protoseg_jax.data import bcss, records, synthetic

DATA_KINDS = ('folder', 'records', 'synthetic')
AUGMENT_ON = ('device', 'host')
SYNTHETIC_FORMATS = ('folder', 'records')


def uses_records(data_config: ml_collections.ConfigDict) -> bool:
  """Whether the config reads converted records (kind 'records', or a synthetic set written as records)."""
  synthetic_format = data_config.synthetic.get('format', 'folder')
  return data_config.kind == 'records' or (data_config.kind == 'synthetic' and synthetic_format == 'records')


def resolve_root(data_config: ml_collections.ConfigDict, workdir: str) -> str:
  """The dataset folder or records directory; for `kind='synthetic'` the set is written first (once).

  With `config.data.synthetic.format='records'` the synthetic folder is also converted, to
  `<root>_records`, through the same converter as a real dataset, and that directory is returned.
  """
  if data_config.kind == 'folder':
    if not data_config.root:
      raise bcss.DatasetError('config.data.root is empty: point it at a BCSS-WSSS folder')
    return data_config.root
  if data_config.kind == 'records':
    if not data_config.root:
      raise bcss.DatasetError('config.data.root is empty: point it at a directory written by '
                              '`python -m protoseg_jax.data.convert`')
    if not epath.Path(data_config.root).exists():
      raise FileNotFoundError(f'records directory not found: {data_config.root} (config.data.root)')
    return data_config.root
  if data_config.kind == 'synthetic':
    synth = data_config.synthetic
    synthetic_format = synth.get('format', 'folder')
    if synthetic_format not in SYNTHETIC_FORMATS:
      raise ValueError(f'config.data.synthetic.format must be one of {SYNTHETIC_FORMATS}, got '
                       f'{synthetic_format!r}')
    root = data_config.root or os.path.join(workdir, 'synthetic_bcss')
    synthetic.write_bcss_layout(root, num_train=synth.num_train, num_val=synth.num_val,
                                num_test=synth.num_test, size=data_config.image_size, seed=synth.seed)
    if synthetic_format == 'folder':
      return root
    from protoseg_jax.data import convert  # pylint: disable=g-import-not-at-top
    splits = [split for split, count in (('train', synth.num_train), ('val', synth.num_val),
                                         ('test', synth.num_test)) if count > 0]
    records_root = root.rstrip('/') + '_records'
    convert.convert_dataset(root, records_root, splits, class_names=data_config.class_names,
                            background_name=data_config.background_name, threads=data_config.decode_threads)
    return records_root
  raise ValueError(f'config.data.kind must be one of {DATA_KINDS}, got {data_config.kind!r}')


def _decode_all(paths: Sequence[str], threads: int) -> np.ndarray:
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    return np.stack(list(pool.map(bcss.read_image, paths)))


def _check_size(image: np.ndarray, path: str, image_size: int) -> None:
  if image.shape[:2] != (image_size, image_size):
    raise bcss.DatasetError(f'{path}: tile is {image.shape[1]}x{image.shape[0]}, expected '
                            f'{image_size}x{image_size} (config.data.image_size)')


def _check_hosts(batch_size: int, process_index: int, process_count: int, config_key: str) -> int:
  """-> the host-local batch size; ValueError naming `config_key` unless it divides evenly."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} / process_count {process_count} out of range')
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'{config_key}={batch_size} must be a positive multiple of the number of hosts '
                     f'({process_count}): each host loads {config_key} / process_count tiles')
  return batch_size // process_count


@dataclasses.dataclass
class TrainBatches:
  """Shuffled training batches `{'images': [b, H, W, 3] uint8, 'labels': [b, C] int32}` from PNG files.

  `batch_size` is the global batch; this host loads rows [p b, (p + 1) b) of each (b = batch_size /
  process_count). The last incomplete batch of an epoch is dropped (as the reference's `drop_last=True`).
  With `host_augment` the images are flipped / rotated / normalised here (float32), seeded by (seed, step,
  global row).
  """

  paths: Sequence[str]
  labels: np.ndarray
  batch_size: int
  seed: int
  image_size: int
  decode_threads: int = 8
  prefetch_batches: int = 2
  cache_in_memory: bool = False
  process_index: int = 0
  process_count: int = 1
  host_augment: Optional[Callable[[dict, np.random.Generator], dict]] = None

  def __post_init__(self):
    if len(self.paths) < self.batch_size:
      raise bcss.DatasetError(f'the training split has {len(self.paths)} tiles, fewer than one batch of '
                              f'{self.batch_size} (config.train.batch_size)')
    self.host_batch = _check_hosts(self.batch_size, self.process_index, self.process_count,
                                   'config.train.batch_size')
    self._cache: Optional[np.ndarray] = None
    if self.cache_in_memory:
      self._cache = _decode_all(self.paths, self.decode_threads)
      for image, path in zip(self._cache, self.paths):
        _check_size(image, path, self.image_size)

  @property
  def steps_per_epoch(self) -> int:
    return len(self.paths) // self.batch_size

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))

  def _load(self, step: int, pool: concurrent.futures.Executor) -> dict:
    epoch, index = divmod(step, self.steps_per_epoch)
    first_row = index * self.batch_size + self.process_index * self.host_batch
    indices = self._order(epoch)[first_row:first_row + self.host_batch]
    if self._cache is not None:
      images = self._cache[indices]
    else:
      images = list(pool.map(bcss.read_image, [self.paths[i] for i in indices]))
      for image, i in zip(images, indices):
        _check_size(image, self.paths[i], self.image_size)
      images = np.stack(images)
    batch = {'images': images, 'labels': self.labels[indices]}
    if self.host_augment is not None:
      row0 = self.process_index * self.host_batch
      rngs = [np.random.default_rng([self.seed, 1, step, row0 + row]) for row in range(len(images))]
      batch['images'] = np.stack([self.host_augment({'images': image}, rng)['images']
                                  for image, rng in zip(images, rngs)])
    return batch

  def iterate(self, start_step: int = 0) -> Iterator[dict]:
    """Batches from global step `start_step` on, forever (epoch after epoch), prefetched in a thread."""
    output: queue.Queue = queue.Queue(maxsize=max(self.prefetch_batches, 1))
    stop = threading.Event()

    def produce():
      with concurrent.futures.ThreadPoolExecutor(max(self.decode_threads, 1)) as pool:
        step = start_step
        try:
          while not stop.is_set():
            batch = self._load(step, pool)
            while not stop.is_set():
              try:
                output.put(batch, timeout=0.1)
                break
              except queue.Full:
                continue
            step += 1
        except Exception as error:  # surfaced in the consumer thread, with its message intact
          output.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
      while True:
        item = output.get()
        if isinstance(item, Exception):
          raise item
        yield item
    finally:
      stop.set()


class FolderTrainIterator:
  """`TrainBatches` behind the iterator interface of `TrainSource.iterator`: state `{'step': n}`."""

  def __init__(self, batches: TrainBatches, state: Optional[dict] = None):
    self._batches = batches
    self._generator: Optional[Iterator[dict]] = None
    self.set_state(state or {'step': 0})

  def set_state(self, state: dict) -> None:
    if not isinstance(state, dict) or not isinstance(state.get('step'), int) or state['step'] < 0:
      raise ValueError(f'data iterator state must be a dict with a non-negative int "step", got {state!r}')
    self.close()
    self._step = state['step']
    self._generator = self._batches.iterate(start_step=self._step)

  def get_state(self) -> dict:
    return {'step': self._step}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._generator)
    self._step += 1
    return batch

  def close(self) -> None:
    if self._generator is not None:
      self._generator.close()
    self._generator = None


@dataclasses.dataclass
class TrainSource:
  """Training data of one host. `iterator(state)` -> an iterator of host-local batches
  `{'images': [b, H, W, 3] uint8 (float32 if augment_on='host'), 'labels': [b, C] int32}` with
  `get_state() -> dict` (JSON-serialisable) and `set_state(dict)`; `state=None` starts at step 0."""

  num_examples: int
  steps_per_epoch: int
  host_batch_size: int
  _make_iterator: Callable[[Optional[dict]], object]

  def iterator(self, state: Optional[dict] = None):
    return self._make_iterator(state)


def _check_augment_on(data_config: ml_collections.ConfigDict) -> str:
  augment_on = data_config.get('augment_on', 'device')
  if augment_on not in AUGMENT_ON:
    raise ValueError(f'config.data.augment_on must be one of {AUGMENT_ON}, got {augment_on!r}')
  return augment_on


def make_train_source(data_config: ml_collections.ConfigDict, root: str, global_batch_size: int, seed: int,
                      process_index: int = 0, process_count: int = 1) -> TrainSource:
  """This host's training batches (see the module docstring for the order and sharding)."""
  host_batch = _check_hosts(global_batch_size, process_index, process_count, 'config.train.batch_size')
  augment_on = _check_augment_on(data_config)
  if uses_records(data_config):
    from protoseg_jax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
    split = records.open_split(root, 'train')
    dataset, steps_per_epoch = grain_pipeline.train_dataset(split, data_config, global_batch_size, seed,
                                                            process_index, process_count)
    del dataset  # built to validate the split and config now; iterators rebuild it from their start step

    def build(start_step: int):
      return grain_pipeline.train_dataset(split, data_config, global_batch_size, seed, process_index,
                                          process_count, start_step)[0]

    worker_count = data_config.grain.worker_count
    return TrainSource(split.num_examples, steps_per_epoch, host_batch,
                       lambda state: grain_pipeline.RecordTrainIterator(build, worker_count, state))
  host_augment = None
  if augment_on == 'host':
    from protoseg_jax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
    host_augment = grain_pipeline.HostAugment.from_config(data_config)
  batches = load_train_batches(root, data_config, global_batch_size, seed, process_index, process_count,
                               host_augment)
  return TrainSource(len(batches.paths), batches.steps_per_epoch, host_batch,
                     lambda state: FolderTrainIterator(batches, state))


@dataclasses.dataclass
class EvalSet:
  """A val/test split held as uint8 arrays: images `[N, H, W, 3]`, masks `[N, H, W]`, labels `[N, C]`."""

  images: np.ndarray
  masks: np.ndarray
  labels: np.ndarray
  names: list[str]

  def batches(self, batch_size: int, num_batches: Optional[int] = None) -> Iterator[dict]:
    """Fixed-size batches; padding rows (zeros) are flagged by `valid` `[B]` bool.

    `num_batches` (default: just enough) appends all-padding batches, so every host yields as many.
    """
    count = len(self.names)
    if num_batches is None:
      num_batches = -(-count // batch_size)
    for start in range(0, num_batches * batch_size, batch_size):
      index = np.arange(start, start + batch_size)
      valid = index < count
      if valid.all():
        yield {'images': self.images[index], 'masks': self.masks[index], 'labels': self.labels[index],
               'valid': valid}
        continue
      batch = {'images': np.zeros((batch_size,) + self.images.shape[1:], self.images.dtype),
               'masks': np.zeros((batch_size,) + self.masks.shape[1:], self.masks.dtype),
               'labels': np.zeros((batch_size,) + self.labels.shape[1:], self.labels.dtype), 'valid': valid}
      real = index[valid]
      for key, values in (('images', self.images), ('masks', self.masks), ('labels', self.labels)):
        batch[key][:len(real)] = values[real]
      yield batch


def _stack_eval(elements: Sequence[dict], image_size: int, num_classes: int) -> EvalSet:
  if not elements:
    return EvalSet(np.zeros((0, image_size, image_size, 3), np.uint8),
                   np.zeros((0, image_size, image_size), np.uint8), np.zeros((0, num_classes), np.int32), [])
  return EvalSet(np.stack([e['images'] for e in elements]), np.stack([e['masks'] for e in elements]),
                 np.stack([e['labels'] for e in elements]).astype(np.int32), [e['names'] for e in elements])


def _load_folder_eval(root: str, split: str, num_classes: int, image_size: int, threads: int,
                      process_index: int = 0, process_count: int = 1) -> tuple[EvalSet, int]:
  """-> (this host's tiles p, p + P, ... of the split, decoded; the split's total tile count)."""
  pairs = bcss.list_eval_tiles(root, split)
  host_pairs = pairs[process_index::process_count]

  def load(pair: tuple[str, str]) -> dict:
    image_path, mask_path = pair
    image = bcss.read_image(image_path)
    _check_size(image, image_path, image_size)
    mask = bcss.read_mask(mask_path, num_classes + 1)
    if mask.shape != image.shape[:2]:
      raise bcss.DatasetError(f'{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is '
                              f'{image.shape[1]}x{image.shape[0]}')
    return {'images': image, 'masks': mask, 'labels': bcss.label_from_mask(mask, num_classes),
            'names': os.path.basename(image_path)}

  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    elements = list(pool.map(load, host_pairs))
  return _stack_eval(elements, image_size, num_classes), len(pairs)


def _load_records_eval(root: str, split: str, num_classes: int, image_size: int, threads: int,
                       process_index: int = 0, process_count: int = 1) -> tuple[EvalSet, int]:
  from protoseg_jax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
  split_records = records.open_split(root, split)
  dataset, _ = grain_pipeline.eval_dataset(split_records, num_classes, image_size, process_index,
                                           process_count, threads)
  return _stack_eval(list(dataset), image_size, num_classes), split_records.num_examples


@dataclasses.dataclass
class EvalSource:
  """One host's share of a val/test split: examples p, p + P, ... (each example on exactly one host).

  `batches()` yields `{'images' [b, H, W, 3] uint8, 'masks' [b, H, W] uint8, 'labels' [b, C] int32,
  'valid' [b] bool}` with b = batch_size / process_count, and every host yields `num_batches` of them
  (padding rows have valid=False). `num_examples` counts the whole split, `names` this host's tiles.
  """

  num_examples: int
  host_batch_size: int
  num_batches: int
  _eval_set: EvalSet

  @property
  def names(self) -> list[str]:
    return list(self._eval_set.names)

  def batches(self) -> Iterator[dict]:
    return self._eval_set.batches(self.host_batch_size, self.num_batches)


def make_eval_source(data_config: ml_collections.ConfigDict, root: str, split: str, num_classes: int,
                     batch_size: int, process_index: int = 0, process_count: int = 1) -> EvalSource:
  """This host's evaluation batches; `batch_size` is the global batch (config.eval.batch_size).

  The host's tiles are decoded once, here, and kept as uint8 arrays (a val split is small: BCSS-WSSS val is
  ~0.5 GB at 224 px, split over the hosts).
  """
  host_batch = _check_hosts(batch_size, process_index, process_count, 'config.eval.batch_size')
  load = _load_records_eval if uses_records(data_config) else _load_folder_eval
  eval_set, num_examples = load(root, split, num_classes, data_config.image_size, data_config.decode_threads,
                                process_index, process_count)
  per_host = -(-num_examples // process_count)
  return EvalSource(num_examples, host_batch, -(-per_host // host_batch), eval_set)


def load_eval_set(root: str, split: str, num_classes: int, image_size: int, threads: int) -> EvalSet:
  """The whole split as uint8 arrays, from a BCSS-WSSS folder or a converted records directory."""
  load = _load_records_eval if records.is_records_dir(root) else _load_folder_eval
  return load(root, split, num_classes, image_size, threads)[0]


def load_train_batches(root: str, data_config: ml_collections.ConfigDict, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1,
                       host_augment: Optional[Callable] = None) -> TrainBatches:
  """`TrainBatches` over a BCSS-WSSS folder (records directories: `make_train_source`)."""
  if records.is_records_dir(root):
    raise bcss.DatasetError(f'{root} holds converted records: set config.data.kind=records')
  tiles = bcss.list_train_tiles(root, len(data_config.class_names))
  return TrainBatches([path for path, _ in tiles], np.stack([label for _, label in tiles]), batch_size,
                      seed, data_config.image_size, data_config.decode_threads,
                      data_config.prefetch_batches, data_config.cache_in_memory, process_index, process_count,
                      host_augment)
