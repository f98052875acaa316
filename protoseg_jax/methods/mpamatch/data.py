"""MPAMatch's training batches: labelled and unlabelled windows as a pure function of (seed, step), read ahead
by the core's Grain pipeline (`input_pipeline.step_batches`)."""

from __future__ import annotations

import functools
from typing import Iterator

import ml_collections
import numpy as np

from protoseg_jax.data import images as images_lib, segmentation_sets as sets
from protoseg_jax.errors import DatasetError

IGNORE = sets.IGNORE


def _window(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, size: int):
  """A random `size x size` window (pad beyond the image: image 0, mask IGNORE)."""
  height, width = mask.shape
  y = rng.integers(0, max(height - size, 0) + 1)
  x = rng.integers(0, max(width - size, 0) + 1)
  image, mask = image[y:y + size, x:x + size], mask[y:y + size, x:x + size]
  out_image = np.zeros((size, size, 3), np.uint8)
  out_mask = np.full((size, size), IGNORE, np.uint8)
  out_image[:image.shape[0], :image.shape[1]] = image
  out_mask[:mask.shape[0], :mask.shape[1]] = mask
  return out_image, out_mask


class SemiBatches:
  """Labelled and unlabelled training batches as a pure function of (seed, step).

  `batch(step)`: 'x' `[Bl, W, W, 3]` uint8, 'y' `[Bl, W, W]` uint8 (255 = padding), and with unlabelled
  data 'u' `[Bu, W, W, 3]`, 'u_ignore' `[Bu, W, W]` (255 = padding, else 0). Each stream walks its own
  seeded permutation epoch after epoch (the labelled one repeats more often: UniMatch's oversampling).
  """

  def __init__(self, labelled: list, unlabelled: list, labelled_batch: int, unlabelled_batch: int,
               window: int, seed: int):
    if not labelled:
      raise DatasetError('the labelled split is empty')
    self.labelled, self.unlabelled = labelled, unlabelled
    self.labelled_batch, self.unlabelled_batch = labelled_batch, unlabelled_batch
    self.window, self.seed = window, seed

  @functools.lru_cache(maxsize=4)
  def _permutation(self, count: int, stream: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, stream, epoch]).permutation(count)

  def _indices(self, count: int, batch: int, step: int, stream: int) -> list[int]:
    out = []
    for position in range(step * batch, (step + 1) * batch):
      epoch, offset = divmod(position, count)
      out.append(int(self._permutation(count, stream, epoch)[offset]))
    return out

  def batch(self, step: int) -> dict:
    rng = np.random.default_rng([self.seed, 3, step])
    xs, ys = zip(*(_window(rng, *self.labelled[i], self.window)
                   for i in self._indices(len(self.labelled), self.labelled_batch, step, 0)))
    out = {'x': np.stack(xs), 'y': np.stack(ys)}
    if self.unlabelled and self.unlabelled_batch:
      windows = [_window(rng, image, np.zeros(image.shape[:2], np.uint8), self.window)
                 for image in (self.unlabelled[i] for i in
                               self._indices(len(self.unlabelled), self.unlabelled_batch, step, 1))]
      out['u'] = np.stack([w[0] for w in windows])
      out['u_ignore'] = np.stack([w[1] for w in windows])
    return out

  def iterate(self, start_step: int = 0) -> Iterator[dict]:
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


def load_train_batches(data: ml_collections.ConfigDict, train_config: ml_collections.ConfigDict,
                       splits: dict[str, list[sets.Pair]], split: dict, seed: int,
                       need_unlabelled: bool) -> SemiBatches:
  by_id = {pair.id: pair for pair in splits['train']}
  labelled = [sets.load_pair(by_id[i], data) for i in split['labelled']]
  unlabelled = []
  if need_unlabelled:
    if not split['unlabelled']:
      raise DatasetError('the unlabelled split is empty (config.data.labelled_fraction = '
                         f'{data.labelled_fraction}); semi-supervised training needs unlabelled images')
    # Unlabelled masks are never read (UniMatch uses them only to mark padding, which we track ourselves).
    unlabelled = [sets.resize_square(images_lib.read_image(by_id[i].image), data.resize_to, nearest=False)
                  for i in split['unlabelled']]
  window = data.train_window or data.image_size
  return SemiBatches(labelled, unlabelled, train_config.labelled_batch_size,
                     train_config.unlabelled_batch_size if need_unlabelled else 0, window, seed)
