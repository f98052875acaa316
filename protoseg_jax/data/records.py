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
The protobuf wire format (Example > Features > map<string, Feature> > BytesList | FloatList | Int64List) and
the TFRecord framing are written by hand here: reading and writing need neither TensorFlow nor protobuf.
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

import numpy as np
from etils import epath
from PIL import Image

from protoseg_jax.data.bcss import DatasetError, read_mask

FORMAT_VERSION = 'protoseg_jax.bcss_records/1'
DATASET_FILE = 'dataset.json'
TFRECORD = 'tfrecord'
ARRAY_RECORD = 'array_record'
RECORD_FORMATS = (TFRECORD, ARRAY_RECORD)
# One record per chunk (random access without decoding neighbours); PNG bytes are already compressed.
ARRAY_RECORD_WRITER_OPTIONS = 'group_size:1,uncompressed'

PathLike = Union[str, os.PathLike]
FeatureValue = Union[bytes, str, int, Sequence[bytes], Sequence[int], np.ndarray]


# --- CRC32C (Castagnoli), TFRecord's checksum ------------------------------------------------------------

def _crc32c_table() -> tuple[int, ...]:
  """Byte-wise lookup table of the reflected Castagnoli polynomial 0x82F63B78."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()
_CRC32C_TABLE_NP = np.asarray(_CRC32C_TABLE, np.uint32)
# Messages at least this long are checksummed in parallel lanes with NumPy (see `_crc32c_lanes`).
_LANE_THRESHOLD = 4096


def _crc32c_bytewise(data: bytes, crc: int = 0) -> int:
  table = _CRC32C_TABLE
  crc ^= 0xFFFFFFFF
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _apply_gf2(columns: np.ndarray, values: np.ndarray) -> np.ndarray:
  """A 32x32 GF(2) matrix given by its 32 columns (uint32 `[32]`) applied to uint32 `values` `[K]`."""
  bits = (values[:, None] >> np.arange(32, dtype=np.uint32)) & 1
  return np.bitwise_xor.reduce(np.where(bits.astype(bool), columns[None], np.uint32(0)), axis=1)


@functools.lru_cache(maxsize=256)
def _zero_feed_tables(num_bytes: int) -> np.ndarray:
  """`[4, 256]` uint32 tables of the linear map 'feed `num_bytes` zero bytes into a raw CRC register'.

  The map is applied byte-sliced: `Z(x) = T0[x & 255] ^ T1[x >> 8 & 255] ^ T2[x >> 16 & 255] ^ T3[x >> 24]`.
  """
  basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
  one_byte = _CRC32C_TABLE_NP[basis & 0xFF] ^ (basis >> 8)  # Z^1 applied to each basis vector
  columns, power, remaining = basis.copy(), one_byte, num_bytes  # columns := identity
  while remaining:                                              # binary exponentiation of Z^1
    if remaining & 1:
      columns = _apply_gf2(power, columns)
    power = _apply_gf2(power, power)
    remaining >>= 1
  tables = np.zeros((4, 256), np.uint32)
  for slice_index in range(4):
    for bit in range(8):
      size = 1 << bit
      tables[slice_index, size:2 * size] = tables[slice_index, :size] ^ columns[8 * slice_index + bit]
  return tables


def _crc32c_lanes(data: bytes) -> int:
  """CRC32C of a long message: ~sqrt(8 n) equal chunks run side by side, then combined pairwise.

  The raw CRC register update (start 0, no final xor) is linear over GF(2), so leading zero bytes leave it
  unchanged and `raw(A || B) = Z^len(B)(raw(A)) ^ raw(B)` where Z^n feeds n zero bytes. The standard
  initial value 0xFFFFFFFF is the same as complementing the first four message bytes.
  """
  message = np.frombuffer(data, np.uint8).copy()
  message[:4] ^= 0xFF
  lanes = 1 << int(np.clip(np.round(np.log2(np.sqrt(8.0 * len(message)))), 6, 12))  # measured optimum
  lane_length = -(-len(message) // lanes)
  lane_length = -(-lane_length // 64) * 64  # a few distinct lengths, so the zero-feed tables are cached
  padded = np.zeros(lanes * lane_length, np.uint8)
  padded[len(padded) - len(message):] = message
  columns = np.ascontiguousarray(padded.reshape(lanes, lane_length).T).astype(np.uint32)
  registers = np.zeros(lanes, np.uint32)
  table = _CRC32C_TABLE_NP
  for column in columns:
    registers = table[(registers ^ column) & 0xFF] ^ (registers >> 8)
  span = lane_length
  while len(registers) > 1:
    tables = _zero_feed_tables(span)
    left, right = registers[0::2], registers[1::2]
    registers = (tables[0][left & 0xFF] ^ tables[1][(left >> 8) & 0xFF] ^ tables[2][(left >> 16) & 0xFF]
                 ^ tables[3][left >> 24]) ^ right
    span *= 2
  return int(registers[0]) ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
  """CRC-32C (iSCSI / Castagnoli) of `data`; `crc32c(b'123456789') == 0xE3069283`."""
  if len(data) >= _LANE_THRESHOLD:
    return _crc32c_lanes(bytes(data))
  return _crc32c_bytewise(data)


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits, add 0xA282EAD8 (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- tf.train.Example wire format ------------------------------------------------------------------------

def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _feature(value: FeatureValue) -> bytes:
  """One `Feature` message: bytes / str -> bytes_list, ints -> int64_list (packed), floats -> float_list."""
  if isinstance(value, (bytes, str)):
    value = [value]
  if isinstance(value, np.ndarray):
    if value.dtype.kind in 'iub':
      value = [int(v) for v in value.reshape(-1)]
    elif value.dtype.kind == 'f':
      packed = np.asarray(value, '<f4').tobytes()
      return _length_delimited(2, _length_delimited(1, packed))
    else:
      raise TypeError(f'unsupported feature dtype {value.dtype}')
  elif isinstance(value, int):
    value = [value]
  items = list(value)
  if all(isinstance(item, (bytes, str)) for item in items) and items:
    payload = b''.join(_length_delimited(1, item.encode() if isinstance(item, str) else item)
                       for item in items)
    return _length_delimited(1, payload)
  if all(isinstance(item, (int, np.integer)) for item in items):
    packed = b''.join(_varint(int(item)) for item in items)
    return _length_delimited(3, _length_delimited(1, packed) if items else b'')
  raise TypeError(f'unsupported feature value {value!r}')


def encode_example(features: Mapping[str, FeatureValue]) -> bytes:
  """Serialized `tf.train.Example`; map entries sorted by key (identical inputs give identical bytes)."""
  entries = b''.join(
      _length_delimited(1, _length_delimited(1, key.encode()) + _length_delimited(2, _feature(value)))
      for key, value in sorted(features.items()))
  return _length_delimited(1, entries)


class ProtoError(ValueError):
  """Malformed protobuf bytes."""


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if position >= len(data):
      raise ProtoError('truncated varint')
    byte = data[position]
    position += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, position
    shift += 7
    if shift >= 70:
      raise ProtoError('varint longer than 10 bytes')


def _fields(data: memoryview) -> Iterator[tuple[int, int, Union[int, bytes, memoryview]]]:
  """`(field number, wire type, value)` of every field of one message; unknown fields are yielded too.

  Length-delimited values are memoryview slices of `data` (nested messages are parsed without copies).
  """
  position = 0
  while position < len(data):
    key, position = _read_varint(data, position)
    field, wire_type = key >> 3, key & 7
    if field == 0:
      raise ProtoError('field number 0')
    if wire_type == 0:
      value, position = _read_varint(data, position)
    elif wire_type == 1 or wire_type == 5:
      size = 8 if wire_type == 1 else 4
      if position + size > len(data):
        raise ProtoError('truncated fixed-width field')
      value, position = bytes(data[position:position + size]), position + size
    elif wire_type == 2:
      size, position = _read_varint(data, position)
      if position + size > len(data):
        raise ProtoError(f'length-delimited field of {size} bytes runs past the end of its message')
      value, position = data[position:position + size], position + size
    else:
      raise ProtoError(f'unsupported wire type {wire_type}')
    yield field, wire_type, value


def _signed64(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _decode_feature(data: bytes) -> Union[list[bytes], list[int], list[float]]:
  values: list = []
  for field, wire_type, payload in _fields(data):
    if field not in (1, 2, 3) or wire_type != 2:
      continue
    values = []  # oneof: the last kind present wins, as in protobuf
    for inner_field, inner_type, item in _fields(payload):
      if inner_field != 1:
        continue
      if field == 1 and inner_type == 2:
        values.append(bytes(item))
      elif field == 2 and inner_type == 2:
        values.extend(np.frombuffer(item, '<f4').tolist())
      elif field == 2 and inner_type == 5:
        values.append(struct.unpack('<f', item)[0])
      elif field == 3 and inner_type == 2:
        position = 0
        while position < len(item):
          number, position = _read_varint(item, position)
          values.append(_signed64(number))
      elif field == 3 and inner_type == 0:
        values.append(_signed64(item))
      else:
        raise ProtoError(f'wire type {inner_type} in a {("", "bytes", "float", "int64")[field]}_list')
  return values


def decode_example(serialized: bytes) -> dict[str, list]:
  """`{name: [values]}` from a serialized `tf.train.Example` (bytes, int, or float lists); `ProtoError`."""
  features: dict[str, list] = {}
  for field, wire_type, features_message in _fields(memoryview(serialized)):  # slices without copies
    if field != 1 or wire_type != 2:
      continue
    for entry_field, entry_type, entry in _fields(features_message):
      if entry_field != 1 or entry_type != 2:
        continue
      key, value = b'', memoryview(b'')
      for item_field, item_type, item in _fields(entry):
        if item_field == 1 and item_type == 2:
          key = bytes(item)
        elif item_field == 2 and item_type == 2:
          value = item
      try:
        name = key.decode()
      except UnicodeDecodeError:
        raise ProtoError(f'feature name {key!r} is not UTF-8') from None
      features[name] = _decode_feature(value)
  return features


# --- TFRecord framing ------------------------------------------------------------------------------------

def tfrecord_frame(record: bytes) -> bytes:
  """`uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)`, little-endian."""
  header = struct.pack('<Q', len(record))
  return header + struct.pack('<I', masked_crc32c(header)) + record + struct.pack('<I', masked_crc32c(record))


def read_tfrecord(path: PathLike, verify_crc: bool = True) -> Iterator[bytes]:
  """The records of one TFRecord file; `DatasetError` naming the file on truncation or a CRC mismatch.

  Verifying costs about one NumPy pass over every byte (see BUILD_NOTES.md for the measured rate);
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
  """`[H, W, 3]` uint8 RGB from encoded bytes; `DatasetError` naming `where` if unreadable."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert('RGB'))
  except (OSError, SyntaxError, ValueError) as error:
    raise DatasetError(f'{where}: unreadable image ({error})') from None


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
