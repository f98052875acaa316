"""BCSS-WSSS folder -> sharded TFRecord + ArrayRecord files of `tf.train.Example`s, one manifest per split.

  python -m protoseg_jax.data.convert --src=/data/BCSS-WSSS --dst=/data/bcss_records --shard_size=1024
  python -m protoseg_jax.data.convert --src=gs://bucket/BCSS-WSSS --dst=gs://bucket/bcss_records

Tile and mask files are stored byte for byte (never re-encoded); every tile is decoded once here to
validate it (readable, one tile size per split, mask values in range, mask size = tile size), so bad input
fails now, naming the file, rather than hours into training. The record layout is described in
`protoseg_jax.data.records`. A destination that is not empty is refused unless it already holds this
exact conversion (same source listing, options and code format: then nothing is written); `dataset.json`
is written last, and the files of a failed conversion are removed.

The synthetic set goes through the same path: write it with
`python -m protoseg_jax.data.synthetic --out=DIR` and convert DIR, or set
`config.data.synthetic.format='records'` (the trainer then converts it on first use).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
from absl import app, flags, logging
from etils import epath

from protoseg_jax.data.bcss import CLASS_NAMES as BCSS_CLASS_NAMES
from protoseg_jax.data import bcss, records

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(frozen=True)
class SourceTile:
  name: str
  image_path: epath.Path
  mask_path: Optional[epath.Path]     # None for training tiles
  label: Optional[np.ndarray]         # [C] from the file name (train) or None (derived from the mask)


def _images_in(folder: epath.Path) -> list[epath.Path]:
  return sorted((path for path in folder.iterdir() if path.suffix.lower() in bcss.IMAGE_EXTENSIONS),
                key=lambda path: path.name)


def find_split_dir(src: epath.Path, split: str) -> epath.Path:
  """`bcss.find_split_dir` through `epath` (local or bucket paths)."""
  if not src.exists():
    raise FileNotFoundError(f'dataset folder not found: {src} (--src)')
  if split not in bcss.SPLIT_DIRS:
    raise ValueError(f'unknown split {split!r} in --splits: expected some of {", ".join(SPLITS)}')
  for name in bcss.SPLIT_DIRS[split]:
    if (src / name).is_dir():
      return src / name
  raise bcss.DatasetError(f'{src}: no {split} folder (looked for {", ".join(bcss.SPLIT_DIRS[split])})')


def list_split(src: epath.Path, split: str, num_classes: int) -> list[SourceTile]:
  """The split's tiles in file-name order, as `bcss.list_train_tiles` / `bcss.list_eval_tiles` list them."""
  folder = find_split_dir(src, split)
  if split == 'train':
    paths = _images_in(folder)
    if not paths:
      raise bcss.DatasetError(f'{folder}: no tiles (png/jpg/tif)')
    return [SourceTile(path.name, path, None, bcss.parse_label(os.fspath(path), num_classes))
            for path in paths]
  image_dir, mask_dir = folder / 'img', folder / 'mask'
  for path in (image_dir, mask_dir):
    if not path.is_dir():
      raise bcss.DatasetError(f'{path}: folder missing ({split} needs img/ and mask/)')
  images = _images_in(image_dir)
  if not images:
    raise bcss.DatasetError(f'{image_dir}: no tiles (png/jpg/tif)')
  masks = {path.stem: path for path in _images_in(mask_dir)}
  tiles = []
  for image in images:
    if image.stem not in masks:
      raise bcss.DatasetError(f'{image}: no mask {image.stem}.png in {mask_dir}')
    tiles.append(SourceTile(image.name, image, masks[image.stem], None))
  return tiles


def _format_of(path: epath.Path) -> str:
  extension = path.suffix.lower().lstrip('.')
  return {'jpg': 'jpeg', 'tif': 'tiff'}.get(extension, extension)


@dataclasses.dataclass(frozen=True)
class _ConvertedTile:
  tile: records.TileRecord
  image_shape: tuple[int, ...]
  pixel_counts: Optional[np.ndarray]   # [C + 1] for val/test


def _convert_tile(source: SourceTile, num_classes: int) -> _ConvertedTile:
  image_bytes = source.image_path.read_bytes()
  image = records.decode_image(image_bytes, os.fspath(source.image_path))
  mask_bytes, label, pixel_counts = None, source.label, None
  if source.mask_path is not None:
    mask_bytes = source.mask_path.read_bytes()
    try:
      mask = bcss.read_mask(io.BytesIO(mask_bytes), num_classes + 1)
    except bcss.DatasetError as error:
      raise bcss.DatasetError(f'{source.mask_path}: {str(error).split(": ", 1)[-1]}') from None
    if mask.shape != image.shape[:2]:
      raise bcss.DatasetError(f'{source.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image '
                              f'is {image.shape[1]}x{image.shape[0]}')
    label = bcss.label_from_mask(mask, num_classes)
    pixel_counts = np.bincount(mask.reshape(-1), minlength=num_classes + 1).astype(np.int64)
  tile = records.TileRecord(
      name=source.name, image_bytes=image_bytes, image_format=_format_of(source.image_path),
      label=np.asarray(label, np.int32), height=image.shape[0], width=image.shape[1],
      mask_bytes=mask_bytes, mask_format=_format_of(source.mask_path) if source.mask_path else None)
  return _ConvertedTile(tile, image.shape, pixel_counts)


def source_fingerprint(listing: dict[str, list[SourceTile]]) -> str:
  """sha256 over (split, file name, byte size) of every source file: cheap (no file is read)."""
  digest = hashlib.sha256()
  for split in sorted(listing):
    for tile in listing[split]:
      for path in (tile.image_path, tile.mask_path):
        if path is not None:
          digest.update(f'{split}\t{path.parent.name}/{path.name}\t{path.stat().length}\n'.encode())
  return digest.hexdigest()


def _describe_difference(existing: dict, wanted: dict) -> str:
  keys = sorted(key for key in set(existing) | set(wanted)
                if key != 'manifests_sha256' and existing.get(key) != wanted.get(key))
  return ', '.join(f'{key}: {existing.get(key)!r} there, {wanted.get(key)!r} now' for key in keys)


def _check_destination(dst: epath.Path, wanted: dict) -> bool:
  """True if `dst` already holds this conversion; raises if it holds anything else; False if empty."""
  if not dst.exists():
    return False
  if not dst.is_dir():
    raise bcss.DatasetError(f'{dst} is a file, not a directory (--dst)')
  if not any(True for _ in dst.iterdir()):
    return False
  dataset_file = dst / records.DATASET_FILE
  if not dataset_file.exists():
    raise bcss.DatasetError(f'{dst} is not empty and holds no converted dataset ({records.DATASET_FILE} '
                            f'missing: other files, or an interrupted conversion); choose an empty --dst')
  existing = records.read_json(dataset_file)
  difference = _describe_difference(existing, wanted)
  if difference:
    raise bcss.DatasetError(f'{dst} already holds a different converted dataset ({difference}); refusing to '
                            f'mix datasets: choose an empty --dst')
  return True


def _write_split(dst: epath.Path, split: str, tiles: Sequence[SourceTile], class_names: Sequence[str],
                 background_name: str, shard_size: int, formats: Sequence[str], threads: int,
                 written: list[epath.Path]) -> dict:
  """Writes one split's shards and manifest; returns the manifest. Appends every file it creates."""
  num_classes = len(class_names)
  num_shards = -(-len(tiles) // shard_size)
  image_shape, first_tile = None, None
  tiles_with_class = np.zeros(num_classes, np.int64)
  pixels = np.zeros(num_classes + 1, np.int64)
  shards = []
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    for shard_index in range(num_shards):
      shard_tiles = tiles[shard_index * shard_size:(shard_index + 1) * shard_size]
      names = {fmt: records.shard_name(split, fmt, shard_index, num_shards) for fmt in formats}
      written.extend(dst / name for name in names.values())
      writer = records.ShardWriter({fmt: dst / name for fmt, name in names.items()})
      try:
        for converted in pool.map(lambda tile: _convert_tile(tile, num_classes), shard_tiles):
          if image_shape is None:
            image_shape, first_tile = converted.image_shape, converted.tile.name
          elif converted.image_shape != image_shape:
            raise bcss.DatasetError(
                f'{converted.tile.name} ({split}): tile is {converted.image_shape[1]}x'
                f'{converted.image_shape[0]}, but {first_tile} is {image_shape[1]}x{image_shape[0]} (one '
                f'tile size per split)')
          tiles_with_class += converted.tile.label
          if converted.pixel_counts is not None:
            pixels += converted.pixel_counts
          writer.write(records.encode_tile(converted.tile))
      finally:
        digests = writer.close()
      shards.append({'files': names, 'num_examples': writer.count, 'sha256': digests,
                     'first_name': shard_tiles[0].name})
      logging.info('%s: shard %d/%d (%d tiles)', split, shard_index + 1, num_shards, writer.count)
  frequencies = {'tiles_with_class': dict(zip(class_names, tiles_with_class.tolist()))}
  if split != 'train':
    frequencies['pixels'] = dict(zip(list(class_names) + [background_name], pixels.tolist()))
  manifest = {
      'format': records.FORMAT_VERSION, 'split': split, 'num_examples': len(tiles),
      'class_names': list(class_names), 'background_name': background_name,
      'label_source': 'file name' if split == 'train' else 'mask', 'image_shape': list(image_shape),
      'class_frequencies': frequencies, 'formats': list(formats), 'shard_size': shard_size,
      'shards': shards}
  path = dst / records.manifest_name(split)
  written.append(path)
  path.write_text(json.dumps(manifest, indent=1))
  return manifest


def convert_dataset(src: str, dst: str, splits: Sequence[str] = SPLITS, shard_size: int = 1024,
                    class_names: Sequence[str] = BCSS_CLASS_NAMES, background_name: str = 'BACK',
                    formats: Sequence[str] = records.RECORD_FORMATS, threads: int = 8) -> dict:
  """Converts `splits` of the BCSS-WSSS folder `src` into `dst`; returns the `dataset.json` content.

  Idempotent: an identical existing conversion is kept as is; anything else already in `dst` is refused.
  """
  if shard_size < 1:
    raise ValueError(f'--shard_size must be >= 1, got {shard_size}')
  unknown = sorted(set(formats) - set(records.RECORD_FORMATS))
  if unknown or not formats:
    raise ValueError(f'--formats must be some of {", ".join(records.RECORD_FORMATS)}, got {list(formats)}')
  if len(set(splits)) != len(splits) or not splits:
    raise ValueError(f'--splits must name each split once, got {list(splits)}')
  src_path, dst_path = epath.Path(src), epath.Path(dst)
  listing = {split: list_split(src_path, split, len(class_names)) for split in splits}
  wanted = {'format': records.FORMAT_VERSION, 'class_names': list(class_names),
            'background_name': background_name, 'splits': list(splits), 'formats': list(formats),
            'shard_size': shard_size, 'source_fingerprint': source_fingerprint(listing),
            'num_examples': {split: len(tiles) for split, tiles in listing.items()}}
  if _check_destination(dst_path, wanted):
    logging.info('%s already holds this conversion; nothing written', dst_path)
    return records.read_json(dst_path / records.DATASET_FILE)
  dst_path.mkdir(parents=True, exist_ok=True)
  written: list[epath.Path] = []
  try:
    manifests_sha256 = {}
    for split in splits:
      manifest = _write_split(dst_path, split, listing[split], class_names, background_name, shard_size,
                              formats, threads, written)
      manifests_sha256[split] = records.file_sha256(dst_path / records.manifest_name(split))
      logging.info('%s: %d tiles in %d shards', split, manifest['num_examples'], len(manifest['shards']))
    dataset = {**wanted, 'manifests_sha256': manifests_sha256}
    (dst_path / records.DATASET_FILE).write_text(json.dumps(dataset, indent=1))
    return dataset
  except BaseException:
    for path in written:  # leave the destination as it was: empty
      if path.exists():
        path.unlink()
    raise


def _define_flags() -> dict:
  """The CLI's flags; defined only when run as a program, so importing the module defines none."""
  return {
      'src': flags.DEFINE_string('src', None,
                                 'BCSS-WSSS folder (training/, val/{img,mask}/, test/{img,mask}/).'),
      'dst': flags.DEFINE_string('dst', None,
                                 'Output directory (must be empty, or hold this same conversion).'),
      'shard_size': flags.DEFINE_integer('shard_size', 1024, 'Records per shard.'),
      'splits': flags.DEFINE_list('splits', list(SPLITS), 'Splits to convert.'),
      'formats': flags.DEFINE_list('formats', list(records.RECORD_FORMATS),
                                   'Formats to write (Grain reads array_record; tfrecord is for TF tools).'),
      'class_names': flags.DEFINE_list('class_names', list(BCSS_CLASS_NAMES),
                                       'Tissue classes, in label-digit order.'),
      'background_name': flags.DEFINE_string('background_name', 'BACK', 'Name of mask value C (background).'),
      'threads': flags.DEFINE_integer('threads', 8, 'Threads reading and validating tiles.'),
  }


def main(argv, cli: dict):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    values = {name: flag.value for name, flag in cli.items()}
    dataset = convert_dataset(values['src'], values['dst'], values['splits'], values['shard_size'],
                              values['class_names'], values['background_name'], values['formats'],
                              values['threads'])
  except (bcss.DatasetError, FileNotFoundError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)  # bad input: one line naming the file, no traceback
    sys.exit(2)
  counts = ', '.join(f'{split} {count}' for split, count in dataset['num_examples'].items())
  print(f'{cli["dst"].value}: {counts} tiles ({", ".join(dataset["formats"])})')


if __name__ == '__main__':
  _CLI = _define_flags()
  flags.mark_flags_as_required(['src', 'dst'])
  app.run(lambda argv: main(argv, _CLI))
