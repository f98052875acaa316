"""Tile datasets with image-level labels (BCSS-WSSS folders, converted records, the synthetic H&E set):
training sources for `input_pipeline.element_batches` and evaluation splits as `method.EvalSet`.

  kind 'folder'      a BCSS-WSSS layout (`protoseg_jax.data.bcss`), tiles decoded by Grain's threads
  kind 'records'     ArrayRecord shards written by `python -m protoseg_jax.data.convert` (`records`)
  kind 'synthetic'   the procedural H&E set, written on first use in the BCSS-WSSS layout (optionally
                     converted to records: `config.data.synthetic.format='records'`)

Every tile is validated before anything compiles: training tiles by a header probe on host threads (size,
decodability, mode), evaluation tiles by decoding them (they are kept in memory).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from etils import epath

from protoseg_jax.data import bcss, images as images_lib, records, synthetic
from protoseg_jax.errors import ConfigError, DatasetError
from protoseg_jax.method import EvalSet

DATA_KINDS = ('folder', 'records', 'synthetic')
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
      raise DatasetError('config.data.root is empty: point it at a BCSS-WSSS folder')
    if records.is_records_dir(data_config.root):
      raise DatasetError(f'{data_config.root} holds converted records: set config.data.kind=records')
    return data_config.root
  if data_config.kind == 'records':
    if not data_config.root:
      raise DatasetError('config.data.root is empty: point it at a directory written by '
                         '`python -m protoseg_jax.data.convert`')
    if not epath.Path(data_config.root).exists():
      raise DatasetError(f'records directory not found: {data_config.root} (config.data.root)')
    return data_config.root
  if data_config.kind == 'synthetic':
    synth = data_config.synthetic
    synthetic_format = synth.get('format', 'folder')
    if synthetic_format not in SYNTHETIC_FORMATS:
      raise ConfigError(f'config.data.synthetic.format must be one of {SYNTHETIC_FORMATS}, got '
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
  raise ConfigError(f'config.data.kind must be one of {DATA_KINDS}, got {data_config.kind!r}')


def _check_size(image: np.ndarray, path: str, image_size: int) -> None:
  if image.shape[:2] != (image_size, image_size):
    raise DatasetError(f'{path}: tile is {image.shape[1]}x{image.shape[0]}, expected '
                       f'{image_size}x{image_size} (config.data.image_size)')


def _decode_all(paths: Sequence[str], threads: int) -> list[np.ndarray]:
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    return list(pool.map(images_lib.read_image, paths))


def warn_empty_labels(labels: np.ndarray, where: str) -> int:
  """Counts (and warns about) training examples whose image-level label has no class at all."""
  empty = int(np.sum(~np.any(labels > 0, axis=1))) if len(labels) else 0
  if empty:
    logging.warning('%s: %d of %d training tiles have an all-zero label (no class present); they only '
                    'teach "absent" for every class', where, empty, len(labels))
  return empty


def train_source(data_config: ml_collections.ConfigDict, root: str) -> tuple[Any, Callable[[Any], dict], int]:
  """-> (random-access source, per-example decode `-> {'images' [H, W, 3] uint8, 'labels' [C] int32}`,
  number of examples) of the training split; files are validated here."""
  num_classes = len(data_config.class_names)
  size = data_config.image_size
  if uses_records(data_config):
    from protoseg_jax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
    split = records.open_split(root, 'train')
    grain_pipeline.check_split(split, num_classes, size)
    decode = grain_pipeline.DecodeTile(num_classes, size)
    return records.ArrayRecordSource(split), lambda item: decode(item), split.num_examples
  tiles = bcss.list_train_tiles(root, num_classes)
  paths = [path for path, _ in tiles]
  labels = np.stack([label for _, label in tiles])
  warn_empty_labels(labels, root)
  images_lib.probe_images(paths, (size, size), data_config.decode_threads, 'config.data.image_size')
  if data_config.cache_in_memory:
    decoded = _decode_all(paths, data_config.decode_threads)
    for image, path in zip(decoded, paths):
      _check_size(image, path, size)
    items = list(zip(decoded, labels))
    return items, lambda item: {'images': item[0], 'labels': item[1]}, len(items)

  def decode(item):
    path, label = item
    image = images_lib.read_image(path)
    _check_size(image, path, size)
    return {'images': image, 'labels': label}

  return list(zip(paths, labels)), decode, len(paths)


def eval_tiles(data_config: ml_collections.ConfigDict, root: str, split: str, num_classes: int,
               process_index: int = 0, process_count: int = 1) -> EvalSet:
  """This host's tiles p, p + P, ... of a val/test split, decoded and checked, with labels from the masks.

  Masks hold values 0..C (C = background); labels `[N, C]` are the classes present in each mask.
  """
  size = data_config.image_size
  if records.is_records_dir(root):
    from protoseg_jax.data import grain_pipeline  # pylint: disable=g-import-not-at-top
    split_records = records.open_split(root, split)
    dataset, _ = grain_pipeline.eval_dataset(split_records, num_classes, size, process_index, process_count,
                                             data_config.decode_threads)
    elements = list(dataset)
    total = split_records.num_examples
  else:
    pairs = bcss.list_eval_tiles(root, split)
    total = len(pairs)

    def load(pair: tuple[str, str]) -> dict:
      image_path, mask_path = pair
      image = images_lib.read_image(image_path)
      _check_size(image, image_path, size)
      mask = images_lib.read_mask(mask_path, num_classes + 1)
      if mask.shape != image.shape[:2]:
        raise DatasetError(f'{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is '
                           f'{image.shape[1]}x{image.shape[0]}')
      return {'images': image, 'masks': mask, 'labels': images_lib.label_from_mask(mask, num_classes),
              'names': os.path.basename(image_path)}

    with concurrent.futures.ThreadPoolExecutor(max(data_config.decode_threads, 1)) as pool:
      elements = list(pool.map(load, pairs[process_index::process_count]))
  labels = (np.stack([e['labels'] for e in elements]).astype(np.int32) if elements
            else np.zeros((0, num_classes), np.int32))
  return EvalSet(names=[str(e['names']) for e in elements], images=[e['images'] for e in elements],
                 masks=[e['masks'] for e in elements], labels=labels, num_examples=total,
                 per_host=process_count > 1)
