"""BCSS tiles as record files: `tf.train.Example` protos in TFRecord and ArrayRecord shards, without TF.

One converted dataset is a directory, local or `gs://` (JSON and TFRecord files are read and written through
`etils.epath`, ArrayRecord files through riegeli's own local / GCS file layer):

  dataset.json                              format, class names, splits, source fingerprint (written last)
  <split>.manifest.json                     counts, class frequencies, tile shape, shards with sha256
  <split>.tfrecord-00000-of-00003           TFRecord framing (masked CRC32C), for TF / tfds / other readers
  <split>.array_record-00000-of-00003       the same serialized Examples, random access (Grain reads these)

Each record is a `tf.train.Example` with the features
  image/encoded   bytes   the tile file as stored (PNG, never re-encoded)
  image/format    bytes   'png', 'jpeg', ... (from the file extension)
  image/filename  bytes   the tile's file name (e.g. 'TCGA-...+0[1101].png')
  image/height, image/width   int64
  label           int64[C]  multi-hot, class order of `class_names` (val/test: derived from the mask)
  mask/encoded    bytes   val/test only: the mask file as stored (palette, grey or palette-coloured RGB)
  mask/format     bytes   val/test only
Examples are the protobuf messages tensorflow-datasets ships (no TensorFlow), map entries in key order (a
conversion is byte-reproducible); CRC32C is google-crc32c's C code; only the TFRecord framing is ours.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import struct
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import google_crc32c
import numpy as np
from etils import epath

from protoseg_jax.data.images import read_image, read_mask
from protoseg_jax.errors import DatasetError

FORMAT_VERSION = 'protoseg_jax.bcss_records/1'
DATASET_FILE = 'dataset.json'
TFRECORD = 'tfrecord'
ARRAY_RECORD = 'array_record'
RECORD_FORMATS = (TFRECORD, ARRAY_RECORD)
# One record per chunk (random access without decoding neighbours); PNG bytes are already compressed.
ARRAY_RECORD_WRITER_OPTIONS = 'group_size:1,uncompressed'

PathLike = Union[str, os.PathLike]
FeatureValue = Union[bytes, str, int, Sequence[bytes], Sequence[int], np.ndarray]


# --- CRC32C and tf.train.Example, from kept libraries ----------------------------------------------------

def crc32c(data: bytes) -> int:
  """CRC-32C (iSCSI / Castagnoli) of `data`; `crc32c(b'123456789') == 0xE3069283` (google-crc32c's C code)."""
  return google_crc32c.value(bytes(data))


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits, add 0xA282EAD8 (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


@functools.lru_cache(maxsize=1)
def _protos():
  """`(Example, Features, BytesList)`: tensorflow-datasets' generated copies of TensorFlow's protos.

  They import no TensorFlow (tfds' package import takes ~0.3 s, hence lazily).
  """
  from tensorflow_datasets.proto import tf_example_pb2, tf_feature_pb2  # pylint: disable=g-import-not-at-top
  return tf_example_pb2.Example, tf_feature_pb2.Features, tf_feature_pb2.BytesList


class ProtoError(ValueError):
  """Malformed protobuf bytes."""


def _set_feature(feature, value: FeatureValue) -> None:
  """Fills one `Feature`: bytes / str -> bytes_list, ints -> int64_list, float arrays -> float_list."""
  if isinstance(value, (bytes, str)):
    value = [value]
  if isinstance(value, np.ndarray):
    if value.dtype.kind == 'f':
      feature.float_list.value.extend(np.asarray(value, np.float32).reshape(-1).tolist())
      return
    if value.dtype.kind not in 'iub':
      raise TypeError(f'unsupported feature dtype {value.dtype}')
    value = value.reshape(-1).tolist()
  elif isinstance(value, int):
    value = [value]
  items = list(value)
  if items and all(isinstance(item, (bytes, str)) for item in items):
    feature.bytes_list.value.extend(item.encode() if isinstance(item, str) else item for item in items)
  elif all(isinstance(item, (int, np.integer)) for item in items):
    feature.int64_list.SetInParent()  # an empty list is still an (empty) int64_list
    feature.int64_list.value.extend(int(item) for item in items)
  else:
    raise TypeError(f'unsupported feature value {value!r}')


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
  """Serialized `tf.train.Example`, map entries sorted by key: identical inputs give identical bytes.

  protobuf serializes every entry, but the order is ours (UTF-8 byte order): upb's deterministic map order
  puts a key after the keys it is a prefix of ('a' after 'ab') and is promised for one build only. A
  `Features` map is a repeated field, so single-entry `Features` concatenate into one; `Example`'s only
  field, `features = 1`, is framed on the wire exactly like a one-value `BytesList` (`value = 1`, bytes).
  """
  _, features_class, bytes_list_class = _protos()
  entries = []
  for key in sorted(features):
    entry = features_class()
    _set_feature(entry.feature[key], features[key])
    entries.append(entry.SerializeToString())
  return bytes_list_class(value=[b''.join(entries)]).SerializeToString()


def decode_example(serialized: bytes) -> dict[str, list]:
  """`{name: [values]}` from a serialized `tf.train.Example` (bytes, int, or float lists); `ProtoError`."""
  from google.protobuf import message  # pylint: disable=g-import-not-at-top
  try:
    example = _protos()[0].FromString(bytes(serialized))
  except message.DecodeError as error:
    raise ProtoError(str(error) or 'not a valid protobuf message') from None
  features: dict[str, list] = {}
  for name, feature in example.features.feature.items():
    kind = feature.WhichOneof('kind')
    features[name] = list(getattr(feature, kind).value) if kind else []
  return features


# --- TFRecord framing ------------------------------------------------------------------------------------

def tfrecord_frame(record: bytes) -> bytes:
  """`uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`, little-endian."""
  header = struct.pack('<Q', len(record))
  return header + struct.pack('<I', masked_crc32c(header)) + record + struct.pack('<I', masked_crc32c(record))


def read_tfrecord(path: PathLike, verify_crc: bool = True) -> Iterator[bytes]:
  """The records of one TFRecord file; `DatasetError` naming the file on truncation or a CRC mismatch.

  Verifying runs google-crc32c's C code over every byte (GB/s: negligible next to reading the file);
  `verify_crc=False` checks the framing only.
  """
  with epath.Path(path).open('rb') as handle:
    index, offset = 0, 0
    while True:
      header = handle.read(12)
      if not header:
        return
      if len(header) < 12:
        raise DatasetError(f'{path}: truncated at byte {offset} (record {index} header has {len(header)} '
                           f'of 12 bytes)')
      length, length_crc = struct.unpack('<QI', header)
      if verify_crc and masked_crc32c(header[:8]) != length_crc:
        raise DatasetError(f'{path}: record {index} at byte {offset}: length CRC mismatch (corrupt file)')
      body = handle.read(length + 4)
      if len(body) < length + 4:
        raise DatasetError(f'{path}: truncated at byte {offset} (record {index} of {length} bytes is cut '
                           f'short)')
      data, (data_crc,) = body[:length], struct.unpack('<I', body[length:])
      if verify_crc and masked_crc32c(data) != data_crc:
        raise DatasetError(f'{path}: record {index} at byte {offset}: data CRC mismatch (corrupt file)')
      yield data
      index += 1
      offset += 16 + length


class ShardWriter:
  """Writes one shard in every requested format and hashes what it wrote (sha256 per file)."""

  def __init__(self, paths: Mapping[str, epath.Path]):
    self.paths = dict(paths)
    self.count = 0
    self._tfrecord = None
    self._tfrecord_hash = hashlib.sha256()
    self._array_record = None
    if TFRECORD in self.paths:
      self._tfrecord = self.paths[TFRECORD].open('wb')
    if ARRAY_RECORD in self.paths:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      self._array_record = array_record_module.ArrayRecordWriter(os.fspath(self.paths[ARRAY_RECORD]),
                                                                 ARRAY_RECORD_WRITER_OPTIONS)

  def write(self, record: bytes) -> None:
    if self._tfrecord is not None:
      framed = tfrecord_frame(record)
      self._tfrecord.write(framed)
      self._tfrecord_hash.update(framed)
    if self._array_record is not None:
      self._array_record.write(record)
    self.count += 1

  def close(self) -> dict[str, str]:
    """Closes the files; `{format: sha256 hex}`."""
    digests = {}
    if self._tfrecord is not None:
      self._tfrecord.close()
      digests[TFRECORD] = self._tfrecord_hash.hexdigest()
    if self._array_record is not None:
      self._array_record.close()
      digests[ARRAY_RECORD] = file_sha256(self.paths[ARRAY_RECORD])
    return digests


def file_sha256(path: PathLike) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as handle:
    for block in iter(lambda: handle.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


# --- layout and manifests --------------------------------------------------------------------------------

def shard_name(split: str, record_format: str, index: int, num_shards: int) -> str:
  return f'{split}.{record_format}-{index:05d}-of-{num_shards:05d}'


def manifest_name(split: str) -> str:
  return f'{split}.manifest.json'


def is_records_dir(root: PathLike) -> bool:
  return (epath.Path(root) / DATASET_FILE).exists()


def read_json(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as error:
    raise DatasetError(f'{path}: not valid JSON ({error})') from None


@dataclasses.dataclass(frozen=True)
class SplitRecords:
  """One converted split: its manifest and the paths of its shards per format."""

  root: epath.Path
  split: str
  manifest: dict

  @property
  def num_examples(self) -> int:
    return int(self.manifest['num_examples'])

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.manifest['class_names'])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.manifest['image_shape'])

  def shard_paths(self, record_format: str) -> list[epath.Path]:
    if record_format not in self.manifest['formats']:
      raise DatasetError(f'{self.root / manifest_name(self.split)}: the split was converted without '
                         f'{record_format} shards (formats: {", ".join(self.manifest["formats"])}); convert '
                         f'again with --formats={TFRECORD},{ARRAY_RECORD}')
    return [self.root / shard['files'][record_format] for shard in self.manifest['shards']]

  def shard_counts(self) -> list[int]:
    return [int(shard['num_examples']) for shard in self.manifest['shards']]


def open_split(root: PathLike, split: str) -> SplitRecords:
  """Reads `dataset.json` and the split's manifest; errors name the directory or file."""
  root = epath.Path(root)
  if not root.exists():
    raise FileNotFoundError(f'records directory not found: {root} (config.data.root)')
  dataset_file = root / DATASET_FILE
  if not dataset_file.exists():
    raise DatasetError(f'{root}: not a converted dataset (no {DATASET_FILE}); write one with '
                       f'`python -m protoseg_jax.data.convert --src=BCSS-WSSS/ --dst={root}`')
  dataset = read_json(dataset_file)
  if dataset.get('format') != FORMAT_VERSION:
    raise DatasetError(f'{dataset_file}: format {dataset.get("format")!r}, this code reads '
                       f'{FORMAT_VERSION!r}: convert again')
  if split not in dataset.get('splits', []):
    raise DatasetError(f'{root}: no {split} split (converted: {", ".join(dataset.get("splits", []))})')
  manifest_path = root / manifest_name(split)
  if not manifest_path.exists():
    raise DatasetError(f'{manifest_path}: manifest missing')
  manifest = read_json(manifest_path)
  return SplitRecords(root, split, manifest)


def verify_split(records: SplitRecords, record_formats: Sequence[str] = RECORD_FORMATS) -> None:
  """Checks every shard's sha256 against the manifest (reads all bytes); `DatasetError` naming the shard."""
  for shard in records.manifest['shards']:
    for record_format in record_formats:
      if record_format not in shard['files']:
        continue
      path = records.root / shard['files'][record_format]
      if not path.exists():
        raise DatasetError(f'{path}: shard missing')
      if file_sha256(path) != shard['sha256'][record_format]:
        raise DatasetError(f'{path}: sha256 differs from {manifest_name(records.split)} (corrupt or '
                           f'replaced shard)')


# --- the BCSS example schema -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TileRecord:
  """One tile as stored: file bytes, never decoded. `mask_bytes` is None for training tiles."""

  name: str
  image_bytes: bytes
  image_format: str
  label: np.ndarray            # [C] int32 multi-hot
  height: int
  width: int
  mask_bytes: Optional[bytes] = None
  mask_format: Optional[str] = None


def encode_tile(tile: TileRecord) -> bytes:
  features: dict[str, FeatureValue] = {
      'image/encoded': tile.image_bytes, 'image/format': tile.image_format, 'image/filename': tile.name,
      'image/height': tile.height, 'image/width': tile.width,
      'label': np.asarray(tile.label, np.int64)}
  if tile.mask_bytes is not None:
    features['mask/encoded'] = tile.mask_bytes
    features['mask/format'] = tile.mask_format or 'png'
  return encode_example(features)


def _single_bytes(features: dict, key: str, where: str, required: bool = True) -> Optional[bytes]:
  values = features.get(key)
  if values is None and not required:
    return None
  if not values or len(values) != 1 or not isinstance(values[0], bytes):
    raise DatasetError(f'{where}: feature {key!r} must hold exactly one bytes value')
  return values[0]


def decode_tile(serialized: bytes, num_classes: int, where: str) -> TileRecord:
  """Parses one Example into a `TileRecord`; `where` (shard and record index) starts every error."""
  try:
    features = decode_example(serialized)
  except ProtoError as error:
    raise DatasetError(f'{where}: corrupt record, not a tf.train.Example ({error})') from None
  name_bytes = _single_bytes(features, 'image/filename', where)
  name = name_bytes.decode('utf-8', errors='replace')
  where = f'{where} ({name})'
  label = features.get('label')
  if label is None or any(not isinstance(v, int) for v in label):
    raise DatasetError(f'{where}: int64 feature "label" missing')
  if len(label) != num_classes or any(v not in (0, 1) for v in label):
    raise DatasetError(f'{where}: label {label} must be {num_classes} values 0/1 (one per class in '
                       f'config.data.class_names)')
  sizes = [(features.get(key) or [0])[0] for key in ('image/height', 'image/width')]
  sizes = [size if isinstance(size, int) else 0 for size in sizes]  # informative only; the image decides
  mask_bytes = _single_bytes(features, 'mask/encoded', where, required=False)
  mask_format = _single_bytes(features, 'mask/format', where, required=False)
  return TileRecord(name=name, image_bytes=_single_bytes(features, 'image/encoded', where),
                    image_format=(_single_bytes(features, 'image/format', where, False) or b'').decode(),
                    label=np.asarray(label, np.int32), height=int(sizes[0]), width=int(sizes[1]),
                    mask_bytes=mask_bytes, mask_format=mask_format.decode() if mask_format else None)


def decode_image(data: bytes, where: str) -> np.ndarray:
  """`[H, W, 3]` uint8 RGB from encoded bytes, as `images.read_image`; `DatasetError` naming `where`."""
  return read_image(io.BytesIO(data), name=where)


def decode_mask(data: bytes, num_values: int, where: str) -> np.ndarray:
  """`[H, W]` uint8 class values (palette, grey, or palette-coloured RGB bytes), as `bcss.read_mask`."""
  try:
    return read_mask(io.BytesIO(data), num_values)
  except DatasetError as error:
    detail = str(error).split(': ', 1)[-1]  # bcss names the file object; name the record instead
    raise DatasetError(f'{where}: mask {detail}') from None


# --- random access for Grain -----------------------------------------------------------------------------

class ArrayRecordSource:
  """A split's ArrayRecord shards as a Grain random-access source: `source[key] -> (where, Example bytes)`.

  `where` ('<shard path>: record <position>') starts every error raised about that record downstream.

  Every shard's record count is checked against the manifest when the source is built (a truncated
  shard is reported there, naming the file); a record riegeli cannot read (its chunks are hashed) is
  reported naming the shard and position. Picklable: Grain worker processes reopen the files.
  """

  def __init__(self, records: SplitRecords):
    self.records = records
    self.paths = [os.fspath(path) for path in records.shard_paths(ARRAY_RECORD)]
    self.counts = records.shard_counts()
    self._offsets = np.cumsum([0] + self.counts)
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    for path, expected in zip(self.paths, self.counts):
      if not epath.Path(path).exists():
        raise DatasetError(f'{path}: shard missing')
      try:
        reader = array_record_module.ArrayRecordReader(path)
        found = reader.num_records()
        reader.close()
      except (RuntimeError, ValueError, OSError) as error:
        detail = f': {type(error).__name__} {error}' if str(error) else ''
        raise DatasetError(f'{path}: unreadable ArrayRecord shard (truncated or corrupt{detail})') from None
      if found != expected:
        raise DatasetError(f'{path}: holds {found} records, {manifest_name(records.split)} says {expected} '
                           f'(truncated or replaced shard)')
    self._source = self._open()

  def _open(self):
    import grain  # pylint: disable=g-import-not-at-top
    # 'path[0:n]' spares Grain re-opening every shard to count its records (checked above).
    return grain.sources.ArrayRecordDataSource(
        [f'{path}[0:{count}]' for path, count in zip(self.paths, self.counts)])

  def __getstate__(self):
    return {**self.__dict__, '_source': None}  # open readers do not pickle; workers reopen the shards

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._source = self._open()

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def locate(self, key: int) -> str:
    """'<shard path>: record <position>' of a global key."""
    shard = int(np.searchsorted(self._offsets, key, side='right')) - 1
    return f'{self.paths[shard]}: record {key - int(self._offsets[shard])}'

  def __getitem__(self, key: int) -> tuple[str, bytes]:
    key = int(key)
    where = self.locate(key)
    try:
      return where, self._source[key]
    except (RuntimeError, ValueError, OSError) as error:
      raise DatasetError(f'{where}: unreadable ({error})') from None

  def __repr__(self) -> str:
    return f'ArrayRecordSource({self.records.root}, {self.records.split!r}, {len(self)} records)'


def iterate_tfrecords(records: SplitRecords, verify_crc: bool = True) -> Iterator[tuple[str, bytes]]:
  """`(where, Example bytes)` of every record of a split, in order, read from its TFRecord shards."""
  for path, expected in zip(records.shard_paths(TFRECORD), records.shard_counts()):
    count = 0
    for count, record in enumerate(read_tfrecord(path, verify_crc), start=1):
      yield f'{path}: record {count - 1}', record
    if count != expected:
      raise DatasetError(f'{path}: holds {count} records, {manifest_name(records.split)} says {expected} '
                         f'(truncated or replaced shard)')


def read_split_tiles(records: SplitRecords, record_format: str = ARRAY_RECORD,
                     verify_crc: bool = True) -> Iterable[TileRecord]:
  """Every `TileRecord` of a split in order, from either format (used by round-trip checks, eval loading)."""
  num_classes = len(records.class_names)
  if record_format == TFRECORD:
    for where, serialized in iterate_tfrecords(records, verify_crc):
      yield decode_tile(serialized, num_classes, where)
    return
  source = ArrayRecordSource(records)
  for key in range(len(source)):
    where, serialized = source[key]
    yield decode_tile(serialized, num_classes, where)
