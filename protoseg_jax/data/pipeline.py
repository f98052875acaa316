"""Host-side batching over a BCSS-WSSS-layout folder: decode PNGs to uint8, shuffle, batch, prefetch.

Augmentation and normalisation happen on the device (`protoseg_jax.augment`). Batches are a pure function of
(seed, epoch, step), so a run resumed at any step sees exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
from typing import Iterator, Optional, Sequence

import ml_collections
import numpy as np

from protoseg_jax.data import bcss, synthetic


def resolve_root(data_config: ml_collections.ConfigDict, workdir: str) -> str:
  """The dataset folder; for `kind='synthetic'` the set is written there first (once, deterministically)."""
  if data_config.kind == 'folder':
    if not data_config.root:
      raise bcss.DatasetError('config.data.root is empty: point it at a BCSS-WSSS folder')
    return data_config.root
  if data_config.kind == 'synthetic':
    root = data_config.root or os.path.join(workdir, 'synthetic_bcss')
    synth = data_config.synthetic
    synthetic.write_bcss_layout(root, num_train=synth.num_train, num_val=synth.num_val,
                                num_test=synth.num_test, size=data_config.image_size, seed=synth.seed)
    return root
  raise ValueError(f"config.data.kind must be 'folder' or 'synthetic', got {data_config.kind!r}")


def _decode_all(paths: Sequence[str], threads: int) -> np.ndarray:
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    return np.stack(list(pool.map(bcss.read_image, paths)))


def _check_size(image: np.ndarray, path: str, image_size: int) -> None:
  if image.shape[:2] != (image_size, image_size):
    raise bcss.DatasetError(f'{path}: tile is {image.shape[1]}x{image.shape[0]}, expected '
                            f'{image_size}x{image_size} (config.data.image_size)')


@dataclasses.dataclass
class TrainBatches:
  """Shuffled training batches `{'images': [B, H, W, 3] uint8, 'labels': [B, C] int32}`.

  The last incomplete batch of an epoch is dropped (as the reference's `drop_last=True`).
  """

  paths: Sequence[str]
  labels: np.ndarray
  batch_size: int
  seed: int
  image_size: int
  decode_threads: int = 8
  prefetch_batches: int = 2
  cache_in_memory: bool = False

  def __post_init__(self):
    if len(self.paths) < self.batch_size:
      raise bcss.DatasetError(f'the training split has {len(self.paths)} tiles, fewer than one batch of '
                              f'{self.batch_size} (config.train.batch_size)')
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

  def _load(self, indices: np.ndarray, pool: concurrent.futures.Executor) -> dict:
    if self._cache is not None:
      images = self._cache[indices]
    else:
      images = list(pool.map(bcss.read_image, [self.paths[i] for i in indices]))
      for image, i in zip(images, indices):
        _check_size(image, self.paths[i], self.image_size)
      images = np.stack(images)
    return {'images': images, 'labels': self.labels[indices]}

  def iterate(self, start_step: int = 0) -> Iterator[dict]:
    """Batches from global step `start_step` on, forever (epoch after epoch), prefetched in a thread."""
    output: queue.Queue = queue.Queue(maxsize=max(self.prefetch_batches, 1))
    stop = threading.Event()

    def produce():
      with concurrent.futures.ThreadPoolExecutor(max(self.decode_threads, 1)) as pool:
        step = start_step
        try:
          while not stop.is_set():
            epoch, index = divmod(step, self.steps_per_epoch)
            order = self._order(epoch)
            batch = self._load(order[index * self.batch_size:(index + 1) * self.batch_size], pool)
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


@dataclasses.dataclass
class EvalSet:
  """A val/test split held as uint8 arrays: images `[N, H, W, 3]`, masks `[N, H, W]`, labels `[N, C]`."""

  images: np.ndarray
  masks: np.ndarray
  labels: np.ndarray
  names: list[str]

  def batches(self, batch_size: int) -> Iterator[dict]:
    """Fixed-size batches; the last is padded by repeating sample 0 and flagged by `valid` `[B]` bool."""
    count = len(self.names)
    for start in range(0, count, batch_size):
      index = np.arange(start, start + batch_size)
      valid = index < count
      index = np.where(valid, index, 0)
      yield {'images': self.images[index], 'masks': self.masks[index], 'labels': self.labels[index],
             'valid': valid}


def load_eval_set(root: str, split: str, num_classes: int, image_size: int, threads: int) -> EvalSet:
  pairs = bcss.list_eval_tiles(root, split)
  images = _decode_all([image for image, _ in pairs], threads)
  masks = np.stack([bcss.read_mask(mask, num_classes + 1) for _, mask in pairs])
  for (image_path, mask_path), image, mask in zip(pairs, images, masks):
    _check_size(image, image_path, image_size)
    if mask.shape != image.shape[:2]:
      raise bcss.DatasetError(f'{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is '
                              f'{image.shape[1]}x{image.shape[0]}')
  labels = np.stack([bcss.label_from_mask(mask, num_classes) for mask in masks])
  names = [os.path.basename(image) for image, _ in pairs]
  return EvalSet(images, masks, labels, names)


def load_train_batches(root: str, data_config: ml_collections.ConfigDict, batch_size: int,
                       seed: int) -> TrainBatches:
  tiles = bcss.list_train_tiles(root, len(data_config.class_names))
  return TrainBatches([path for path, _ in tiles], np.stack([label for _, label in tiles]), batch_size,
                      seed, data_config.image_size, data_config.decode_threads,
                      data_config.prefetch_batches, data_config.cache_in_memory)
