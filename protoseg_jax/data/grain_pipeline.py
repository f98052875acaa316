"""Grain transforms of tile records (`protoseg_jax.data.records`) and host-side augmentation.

Training batches are built by `protoseg_jax.data.input_pipeline.element_batches` from
`records.ArrayRecordSource` + `DecodeTile` (or a folder source); `HostAugment` is its optional host
transform (`config.data.augment_on='host'`). Evaluation: host p reads records p, p + P, p + 2P, ... (each
record exactly once across hosts), unshuffled, unaugmented (`eval_dataset`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import ml_collections
import numpy as np

from protoseg_jax.data import records as records_lib
from protoseg_jax.data.bcss import DatasetError


# --- host-side augmentation (the default is on the device: protoseg_jax.augment) -------------------------

def host_flip_rotate(image: np.ndarray, rng: np.random.Generator, hflip: bool = True, vflip: bool = True,
                     rot90: bool = True, *, rot90_prob: float = 0.5) -> np.ndarray:
  """`[H, W, C]` -> same: horizontal flip (p 0.5), vertical flip (p 0.5), then a quarter-turn rotation.

  The same transformations, in the same order and with the same distribution, as the on-device
  `augment.flip_rotate`: albumentations' `RandomRotate90(p=rot90_prob)` fires with probability
  `rot90_prob` and then turns by k ~ U{0..3}; otherwise k = 0 (default 0.5: P(k=0) = 0.625, 0.125 for each
  other k). `rot90_prob=1.0` is k ~ U{0..3} with the random stream of older versions (no extra draw).
  """
  if not 0.0 <= rot90_prob <= 1.0:
    raise ValueError(f'config.data.augment.rot90_prob is {rot90_prob}; expected a probability in [0, 1]')
  if hflip and rng.random() < 0.5:
    image = image[:, ::-1]
  if vflip and rng.random() < 0.5:
    image = image[::-1]
  if rot90:
    if image.shape[0] != image.shape[1]:
      raise ValueError(f'rot90 augmentation needs square tiles, got {image.shape[:2]} (config.data.augment)')
    quarter_turns = int(rng.integers(0, 4))
    if rot90_prob < 1.0 and not rng.random() < rot90_prob:
      quarter_turns = 0
    image = np.rot90(image, quarter_turns, axes=(0, 1))
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
  rot90_prob: float = 0.5   # albumentations RandomRotate90 p (config.data.augment.rot90_prob)
  channel_order: str = 'rgb'  # config.data.channel_order, as augment.to_model_input applies it

  @classmethod
  def from_config(cls, data_config: ml_collections.ConfigDict) -> 'HostAugment':
    augment = data_config.augment
    return cls(bool(augment.hflip), bool(augment.vflip), bool(augment.rot90), tuple(data_config.mean),
               tuple(data_config.std), float(augment.get('rot90_prob', 0.5)),
               str(data_config.get('channel_order', 'rgb')))

  def __call__(self, element: dict, rng: np.random.Generator) -> dict:
    image = host_flip_rotate(element['images'], rng, self.hflip, self.vflip, self.rot90,
                             rot90_prob=self.rot90_prob)
    if self.channel_order == 'bgr':
      image = image[..., ::-1]
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
