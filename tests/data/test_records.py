"""Record files: TFRecord framing and its CRCs, Example bytes, the converter's round trip and errors."""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from protoseg_jax.data import bcss, convert, records, synthetic

CLASSES = 4


# --- independent references ------------------------------------------------------------------------------

def _masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC-32C, computed with the independent `crc32c` package (C implementation)."""
  import crc32c

  crc = crc32c.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xa282ead8) & 0xffffffff


def assert_frames_verify(path, payloads):
  """Both CRCs of every record of a TFRecord file check with `crc32c`; the framing holds `payloads`."""
  data, offset = open(path, 'rb').read(), 0
  for payload in payloads:
    header = data[offset:offset + 8]
    assert struct.unpack('<Q', header)[0] == len(payload)
    assert struct.unpack('<I', data[offset + 8:offset + 12])[0] == _masked_crc(header)
    start = offset + 12
    assert data[start:start + len(payload)] == payload
    assert struct.unpack('<I', data[start + len(payload):start + len(payload) + 4])[0] == _masked_crc(payload)
    offset = start + len(payload) + 4
  assert offset == len(data)


def example_message_class():
  """`tf.train.Example` built by google.protobuf from a hand-written descriptor (not tfds' generated code)."""
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

  field = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(name='test_example.proto', package='tensorflow', syntax='proto3')

  def message(name, fields):
    result = proto.message_type.add(name=name)
    for spec in fields:
      result.field.add(**spec)
    return result

  repeated, optional = field.LABEL_REPEATED, field.LABEL_OPTIONAL
  message('BytesList', [dict(name='value', number=1, label=repeated, type=field.TYPE_BYTES)])
  for name, kind in (('FloatList', field.TYPE_FLOAT), ('Int64List', field.TYPE_INT64)):
    message(name, [dict(name='value', number=1, label=repeated, type=kind)]).field[0].options.packed = True
  feature = message('Feature', [
      dict(name=name, number=number, label=optional, type=field.TYPE_MESSAGE, type_name=f'.tensorflow.{kind}',
           oneof_index=0)
      for number, (name, kind) in enumerate((('bytes_list', 'BytesList'), ('float_list', 'FloatList'),
                                             ('int64_list', 'Int64List')), start=1)])
  feature.oneof_decl.add(name='kind')
  features = message('Features', [dict(name='feature', number=1, label=repeated, type=field.TYPE_MESSAGE,
                                       type_name='.tensorflow.Features.FeatureEntry')])
  entry = features.nested_type.add(name='FeatureEntry')
  entry.options.map_entry = True
  entry.field.add(name='key', number=1, label=optional, type=field.TYPE_STRING)
  entry.field.add(name='value', number=2, label=optional, type=field.TYPE_MESSAGE,
                  type_name='.tensorflow.Feature')
  message('Example', [dict(name='features', number=1, label=optional, type=field.TYPE_MESSAGE,
                           type_name='.tensorflow.Features')])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName('tensorflow.Example'))


# --- CRC and framing -------------------------------------------------------------------------------------

def test_crc32c_is_google_crc32c_c_extension_and_matches_the_crc32c_package():
  import crc32c
  import google_crc32c

  # The pure-Python fallback is ~1000x slower (3 MB/s): verifying a converted BCSS split would take hours.
  assert google_crc32c.implementation == 'c'
  assert records.crc32c(b'123456789') == 0xE3069283  # the standard CRC-32C check value
  rng = np.random.default_rng(0)
  for size in (0, 1, 31, 4096, 70001):
    data = rng.integers(0, 256, size, np.uint8).tobytes()
    assert records.crc32c(data) == crc32c.crc32c(data)
    assert records.masked_crc32c(data) == _masked_crc(data)


def test_masked_crc_and_frame_bytes():
  # Hand-computed: rotr15(0xE3069283) = 0x2507C60D; + 0xA282EAD8 = 0xC78AB0E5 (mod 2^32).
  assert records.masked_crc32c(b'123456789') == 0xC78AB0E5
  assert records.masked_crc32c(b'') == 0xA282EAD8
  frame = records.tfrecord_frame(b'123456789')
  assert frame[:8] == struct.pack('<Q', 9)
  assert frame[8:12] == struct.pack('<I', records.masked_crc32c(struct.pack('<Q', 9)))
  assert frame[12:21] == b'123456789'
  assert frame[21:] == bytes.fromhex('e5b08ac7')  # 0xC78AB0E5 little-endian


def _write_tfrecord(path, payloads):
  with open(path, 'wb') as handle:
    for payload in payloads:
      handle.write(records.tfrecord_frame(payload))


def test_tfrecord_read_by_grains_independent_reader(tmp_path):
  """Grain's own TFRecord reader (framing only) returns our records; every CRC checks with `crc32c`."""
  import grain

  payloads = [b'', b'a', os.urandom(5000), b'123456789']
  path = str(tmp_path / 'x.tfrecord')
  _write_tfrecord(path, payloads)
  assert list(grain.experimental.TFRecordIterDataset(path)) == payloads
  assert_frames_verify(path, payloads)
  assert list(records.read_tfrecord(path)) == payloads


def test_tfrecord_read_by_tensorflow_or_tfrecord_package(tmp_path):
  payloads = [b'first', os.urandom(3000), b'', os.urandom(70001)]
  path = str(tmp_path / 'x.tfrecord')
  _write_tfrecord(path, payloads)
  try:
    import tensorflow as tf
  except ImportError:
    tf = None
  if tf is not None:
    assert [bytes(r.numpy()) for r in tf.data.TFRecordDataset(path)] == payloads
  else:
    try:
      from tfrecord import reader
    except ImportError:
      pytest.skip('neither tensorflow nor the tfrecord package (the test extra) is installed: no independent '
                  'TFRecord reader')
    assert [bytes(r) for r in reader.tfrecord_iterator(path)] == payloads  # the framing
  assert_frames_verify(path, payloads)  # the tfrecord package does not check CRCs


def test_tfrecord_corrupt_and_truncated_files_are_named(tmp_path):
  path = str(tmp_path / 'x.tfrecord')
  _write_tfrecord(path, [b'a' * 100, b'b' * 100])
  data = bytearray(open(path, 'rb').read())
  data[150] ^= 1  # inside the second record's data
  corrupt = str(tmp_path / 'corrupt.tfrecord')
  open(corrupt, 'wb').write(bytes(data))
  with pytest.raises(bcss.DatasetError, match=r'corrupt\.tfrecord: record 1 .*data CRC mismatch'):
    list(records.read_tfrecord(corrupt))
  assert len(list(records.read_tfrecord(corrupt, verify_crc=False))) == 2
  data = bytearray(open(path, 'rb').read())
  data[116 + 9] ^= 1  # the second record's length CRC
  open(corrupt, 'wb').write(bytes(data))
  with pytest.raises(bcss.DatasetError, match=r'corrupt\.tfrecord: record 1 at byte 116: length CRC mism'):
    list(records.read_tfrecord(corrupt))
  truncated = str(tmp_path / 'truncated.tfrecord')
  open(truncated, 'wb').write(open(path, 'rb').read()[:-10])
  with pytest.raises(bcss.DatasetError, match=r'truncated\.tfrecord: truncated at byte 116'):
    list(records.read_tfrecord(truncated))


# --- Example bytes ---------------------------------------------------------------------------------------

# Keys in no sorted order, with prefixes of one another ('a' < 'a\x00' < 'a/b' < 'ab': upb's own deterministic
# map order puts 'a' last), non-ASCII keys, all value kinds, int64 extremes and empty lists.
MIXED_FEATURES = {
    'z': b'last', 'image/encoded': b'\x89PNG\x00\xff', 'name': 'tile[1101].png', 'B': 7, 'a': [b'', b'x'],
    'ab': '\u00e9', 'a/b': np.array([1, 0, -3, 2 ** 40, -(2 ** 63), 2 ** 63 - 1]),
    '\u00e9': np.array([True, False]),
    '\uffff': np.zeros(0, np.int64), '\U00010000': [], 'scores': np.array([0.5, -1.25, 0.1], np.float64),
    'a\x00': 1}
# Written by the former hand-written encoder (`git show 6cc9cc2:protoseg_jax/data/records.py`); it sorted
# the map entries by key.
MIXED_EXAMPLE_HEX = (
    '0af0010a0a0a014212051a030a01070a0c0a016112070a050a000a01780a0b0a02610012051a030a01010a300a03612f621229'
    '1a270a250100fdffffffffffffffff0180808080802080808080808080808001ffffffffffffffff7f0a0c0a02616212060a04'
    '0a02c3a90a1b0a0d696d6167652f656e636f646564120a0a080a0689504e4700ff0a1a0a046e616d6512120a100a0e74696c65'
    '5b313130315d2e706e670a1a0a0673636f7265731210120e0a0c0000003f0000a0bfcdcccc3d0a0d0a017a12080a060a046c61'
    '73740a0c0a02c3a912061a040a0201000a090a03efbfbf12021a000a0a0a04f090808012021a00')
TILE = records.TileRecord(name='TCGA-A1+0[1101].png', image_bytes=b'\x89PNG\r\n\x1a\n' + bytes(range(20)),
                          image_format='png', label=np.array([1, 1, 0, 1]), height=224, width=224,
                          mask_bytes=b'\x89PNGmask', mask_format='png')
TILE_EXAMPLE_HEX = (  # the same encoder's `encode_tile(TILE)`
    '0aef010a310a0d696d6167652f656e636f64656412200a1e0a1c89504e470d0a1a0a000102030405060708090a0b0c0d0e0f10'
    '1112130a290a0e696d6167652f66696c656e616d6512170a150a13544347412d41312b305b313130315d2e706e670a170a0c69'
    '6d6167652f666f726d617412070a050a03706e670a160a0c696d6167652f68656967687412061a040a02e0010a150a0b696d61'
    '67652f776964746812061a040a02e0010a110a056c6162656c12081a060a04010100010a1c0a0c6d61736b2f656e636f646564'
    '120c0a0a0a0889504e476d61736b0a160a0b6d61736b2f666f726d617412070a050a03706e67')


def test_example_bytes_equal_the_former_encoders_whatever_the_insertion_order():
  assert records.encode_example(MIXED_FEATURES).hex() == MIXED_EXAMPLE_HEX
  assert records.encode_example(dict(reversed(list(MIXED_FEATURES.items())))).hex() == MIXED_EXAMPLE_HEX
  assert records.encode_tile(TILE).hex() == TILE_EXAMPLE_HEX
  assert records.encode_example({}) == b'\x0a\x00'  # an Example with an empty `features` message


def test_example_encoding_parsed_by_a_hand_built_descriptor():
  parsed = example_message_class().FromString(records.encode_example(MIXED_FEATURES)).features.feature
  assert sorted(parsed) == sorted(MIXED_FEATURES)
  assert list(parsed['a'].bytes_list.value) == [b'', b'x']
  assert list(parsed['ab'].bytes_list.value) == ['\u00e9'.encode()]
  assert list(parsed['B'].int64_list.value) == [7]
  assert list(parsed['a/b'].int64_list.value) == [1, 0, -3, 2 ** 40, -(2 ** 63), 2 ** 63 - 1]
  assert list(parsed['\u00e9'].int64_list.value) == [1, 0]
  assert list(parsed['scores'].float_list.value) == [0.5, -1.25, float(np.float32(0.1))]
  for key in ('\uffff', '\U00010000'):
    assert parsed[key].WhichOneof('kind') == 'int64_list' and not parsed[key].int64_list.value
  with pytest.raises(TypeError, match='unsupported feature'):
    records.encode_example({'x': [b'a', 1]})


def test_example_decoding_of_protobuf_serializations():
  message = example_message_class()()
  message.features.feature['label'].int64_list.value.extend([0, 1, -7])
  message.features.feature['image/filename'].bytes_list.value.append(b'a.png')
  message.features.feature['x'].float_list.value.extend([2.5])
  message.features.feature['none'].SetInParent()  # a Feature with no list set
  serialized = message.SerializeToString(deterministic=True)
  assert records.decode_example(serialized) == {'label': [0, 1, -7], 'image/filename': [b'a.png'], 'x': [2.5],
                                                'none': []}
  # Unpacked repeated int64 (legal on the wire) decodes too.
  unpacked = bytes([0x08, 0x05, 0x08, 0x7F])  # Int64List{value: [5, 127]}, each as field 1 / varint
  feature = bytes([0x1A, len(unpacked)]) + unpacked
  entry = bytes([0x0A, 0x01]) + b'k' + bytes([0x12, len(feature)]) + feature
  features = bytes([0x0A, len(entry)]) + entry
  serialized = bytes([0x0A, len(features)]) + features
  parsed = example_message_class().FromString(serialized).features.feature
  assert list(parsed['k'].int64_list.value) == [5, 127]
  assert records.decode_example(serialized) == {'k': [5, 127]}
  with pytest.raises(records.ProtoError):
    records.decode_example(serialized[:-3])
  round_trip = records.decode_example(records.encode_example(MIXED_FEATURES))
  assert round_trip['a/b'] == [1, 0, -3, 2 ** 40, -(2 ** 63), 2 ** 63 - 1] and round_trip['z'] == [b'last']
  assert round_trip['scores'] == [0.5, -1.25, float(np.float32(0.1))] and round_trip['\U00010000'] == []


def test_records_never_import_tensorflow():
  code = ('import sys; from protoseg_jax.data import records; '
          'records.decode_example(records.encode_example({"a": 1})); '
          'print(sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")))')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == '[]'


# --- the converter ---------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def synthetic_folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('synthetic') / 'bcss')
  return synthetic.write_bcss_layout(root, num_train=10, num_val=3, num_test=1, size=32, seed=3)


@pytest.fixture(scope='module')
def converted(synthetic_folder, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp('records') / 'out')
  convert.convert_dataset(synthetic_folder, dst, shard_size=4, threads=2)
  return dst


def expected_tiles(root, split):
  """(name, image bytes, mask bytes | None, label) straight from the folder, with the bcss reader."""
  if split == 'train':
    return [(os.path.basename(path), open(path, 'rb').read(), None, label)
            for path, label in bcss.list_train_tiles(root, CLASSES)]
  return [(os.path.basename(image), open(image, 'rb').read(), open(mask, 'rb').read(),
           bcss.label_from_mask(bcss.read_mask(mask, CLASSES + 1), CLASSES))
          for image, mask in bcss.list_eval_tiles(root, split)]


def assert_round_trip(src, dst, split):
  expected = expected_tiles(src, split)
  split_records = records.open_split(dst, split)
  assert split_records.num_examples == len(expected)
  for record_format in records.RECORD_FORMATS:
    tiles = list(records.read_split_tiles(split_records, record_format))
    assert len(tiles) == len(expected)
    for tile, (name, image_bytes, mask_bytes, label) in zip(tiles, expected):
      assert tile.name == name
      assert tile.image_bytes == image_bytes  # stored as is, not re-encoded
      assert tile.mask_bytes == mask_bytes
      np.testing.assert_array_equal(tile.label, label)
      image = records.decode_image(tile.image_bytes, name)
      assert (tile.height, tile.width) == image.shape[:2]
  records.verify_split(split_records)


def test_round_trip_synthetic_set(synthetic_folder, converted):
  for split in ('train', 'val', 'test'):
    assert_round_trip(synthetic_folder, converted, split)
  manifest = records.open_split(converted, 'train').manifest
  assert [shard['num_examples'] for shard in manifest['shards']] == [4, 4, 2]  # 10 is not a multiple of 4
  labels = np.stack([label for _, _, _, label in expected_tiles(synthetic_folder, 'train')])
  assert list(manifest['class_frequencies']['tiles_with_class'].values()) == labels.sum(0).tolist()
  val = records.open_split(converted, 'val').manifest
  masks = [bcss.read_mask(mask, CLASSES + 1) for _, mask in bcss.list_eval_tiles(synthetic_folder, 'val')]
  assert list(val['class_frequencies']['pixels'].values()) == np.bincount(
      np.concatenate([m.ravel() for m in masks]), minlength=CLASSES + 1).tolist()
  assert val['image_shape'] == [32, 32, 3] and val['num_examples'] == 3
  assert len(records.open_split(converted, 'test').manifest['shards']) == 1  # a single-tile split


def test_conversions_are_byte_reproducible(synthetic_folder, converted, tmp_path):
  """Another conversion (another thread count) writes the same bytes in every file, dataset.json included."""
  again = str(tmp_path / 'again')
  convert.convert_dataset(synthetic_folder, again, shard_size=4, threads=1)
  digest = lambda root, name: hashlib.sha256(open(os.path.join(root, name), 'rb').read()).hexdigest()
  assert sorted(os.listdir(again)) == sorted(os.listdir(converted))
  assert {name: digest(again, name) for name in os.listdir(again)} == {
      name: digest(converted, name) for name in os.listdir(converted)}


def write_png(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8), mode=mode).save(path)


def hand_made_dataset(root):
  """One training tile; one val tile with a grey mask and one with a palette-coloured RGB mask."""
  rng = np.random.default_rng(1)
  write_png(os.path.join(root, 'training', 'only+0[0110].png'), rng.integers(0, 256, (8, 8, 3)))
  mask = np.array([[0, 4], [3, 3]], np.uint8).repeat(4, 0).repeat(4, 1)
  write_png(os.path.join(root, 'val', 'img', 'grey.png'), rng.integers(0, 256, (8, 8, 3)))
  write_png(os.path.join(root, 'val', 'mask', 'grey.png'), mask, mode='L')
  write_png(os.path.join(root, 'val', 'img', 'rgb.png'), rng.integers(0, 256, (8, 8, 3)))
  write_png(os.path.join(root, 'val', 'mask', 'rgb.png'), bcss.BCSS_PALETTE[mask[::-1]])
  return root


def test_round_trip_hand_made_edge_cases(tmp_path):
  src = hand_made_dataset(str(tmp_path / 'src'))
  dst = str(tmp_path / 'dst')
  convert.convert_dataset(src, dst, splits=('train', 'val'), shard_size=1, threads=1)
  for split in ('train', 'val'):
    assert_round_trip(src, dst, split)
  val = records.open_split(dst, 'val')
  assert [shard['num_examples'] for shard in val.manifest['shards']] == [1, 1]
  for tile, (_, mask_path) in zip(records.read_split_tiles(val), bcss.list_eval_tiles(src, 'val')):
    np.testing.assert_array_equal(records.decode_mask(tile.mask_bytes, CLASSES + 1, 'x'),
                                  bcss.read_mask(mask_path, CLASSES + 1))


def test_destination_rules(synthetic_folder, converted, tmp_path):
  before = {name: os.path.getmtime(os.path.join(converted, name)) for name in os.listdir(converted)}
  convert.convert_dataset(synthetic_folder, converted, shard_size=4, threads=2)  # identical: nothing written
  assert {name: os.path.getmtime(os.path.join(converted, name)) for name in os.listdir(converted)} == before
  with pytest.raises(bcss.DatasetError, match='already holds a different converted dataset .*shard_size'):
    convert.convert_dataset(synthetic_folder, converted, shard_size=3)
  other = hand_made_dataset(str(tmp_path / 'other'))
  with pytest.raises(bcss.DatasetError, match='different converted dataset .*source_fingerprint'):
    convert.convert_dataset(other, converted, splits=('train', 'val'), shard_size=4)
  cluttered = tmp_path / 'cluttered'
  cluttered.mkdir()
  (cluttered / 'notes.txt').write_text('mine')
  with pytest.raises(bcss.DatasetError, match='cluttered is not empty'):
    convert.convert_dataset(synthetic_folder, str(cluttered))


def test_bad_source_fails_naming_the_file_and_leaves_no_files(tmp_path):
  src = hand_made_dataset(str(tmp_path / 'src'))
  with open(os.path.join(src, 'val', 'img', 'rgb.png'), 'wb') as handle:
    handle.write(b'not a png')
  dst = tmp_path / 'dst'
  with pytest.raises(bcss.DatasetError, match=r'val/img/rgb\.png: unreadable image'):
    convert.convert_dataset(src, str(dst), splits=('train', 'val'), shard_size=1)
  assert not os.listdir(dst)  # the train shards written before the error were removed
  write_png(os.path.join(src, 'val', 'img', 'rgb.png'), np.zeros((8, 8, 3)))
  write_png(os.path.join(src, 'val', 'mask', 'grey.png'), np.full((8, 8), 9), mode='L')
  with pytest.raises(bcss.DatasetError, match=r'mask/grey\.png: mask values \[9\]'):
    convert.convert_dataset(src, str(dst), splits=('val',))
  write_png(os.path.join(src, 'val', 'mask', 'grey.png'), np.zeros((8, 8)), mode='L')
  write_png(os.path.join(src, 'val', 'img', 'grey.png'), np.zeros((16, 16, 3)))
  with pytest.raises(bcss.DatasetError, match=r'mask/grey\.png: mask is 8x8 but its image is 16x16'):
    convert.convert_dataset(src, str(dst), splits=('val',))
  os.makedirs(tmp_path / 'empty' / 'training')
  with pytest.raises(bcss.DatasetError, match=r'empty/training: no tiles'):
    convert.convert_dataset(str(tmp_path / 'empty'), str(dst), splits=('train',))
  with pytest.raises(FileNotFoundError, match='missing'):
    convert.convert_dataset(str(tmp_path / 'missing'), str(dst))


def test_different_tile_sizes_in_one_split_are_refused(tmp_path):
  src = hand_made_dataset(str(tmp_path / 'src'))
  write_png(os.path.join(src, 'training', 'big+0[1000].png'), np.zeros((16, 16, 3)))
  with pytest.raises(bcss.DatasetError, match=r'only\+0\[0110\]\.png \(train\): tile is 8x8, but big'):
    convert.convert_dataset(src, str(tmp_path / 'dst'), splits=('train',))


def _copy(converted, tmp_path):
  target = str(tmp_path / 'copy')
  shutil.copytree(converted, target)
  return target


def test_corrupt_and_truncated_shards_are_named(converted, tmp_path):
  root = _copy(converted, tmp_path)
  shard = os.path.join(root, 'train.array_record-00001-of-00003')
  data = bytearray(open(shard, 'rb').read())
  truncated = data[:len(data) // 2]
  open(shard, 'wb').write(bytes(truncated))
  # Depending on where the cut falls, riegeli fails to open it or finds fewer records than the manifest.
  message = (r'train\.array_record-00001-of-00003: '
             r'(holds \d records, .*says 4|unreadable ArrayRecord shard \(truncated)')
  with pytest.raises(bcss.DatasetError, match=message):
    records.ArrayRecordSource(records.open_split(root, 'train'))
  with pytest.raises(bcss.DatasetError, match=r'train\.array_record-00001-of-00003: sha256 differs'):
    records.verify_split(records.open_split(root, 'train'))

  shard = os.path.join(root, 'val.array_record-00000-of-00001')
  data = bytearray(open(shard, 'rb').read())
  data[300] ^= 0xFF  # inside the records' chunk (riegeli hashes every chunk)
  open(shard, 'wb').write(bytes(data))
  source = records.ArrayRecordSource(records.open_split(root, 'val'))
  with pytest.raises(bcss.DatasetError, match=r'val\.array_record-00000-of-00001: record 0: unreadable'):
    source[0]

  shard = os.path.join(root, 'test.tfrecord-00000-of-00001')
  data = open(shard, 'rb').read()
  open(shard, 'wb').write(data[:-7])
  with pytest.raises(bcss.DatasetError, match=r'test\.tfrecord-00000-of-00001: truncated at byte 0'):
    list(records.read_split_tiles(records.open_split(root, 'test'), records.TFRECORD))


def test_records_with_wrong_label_or_garbage_are_named():
  where = 'x.array_record-00000-of-00001: record 3'
  bad_label = records.encode_example({'image/filename': 'a.png', 'image/encoded': b'', 'label': [1, 0, 1]})
  with pytest.raises(bcss.DatasetError, match=r'record 3 \(a\.png\): label \[1, 0, 1\] must be 4 values'):
    records.decode_tile(bad_label, CLASSES, where)
  with pytest.raises(bcss.DatasetError, match=r'record 3: corrupt record, not a tf.train.Example'):
    records.decode_tile(b'\x0a\xff\xff\x01garbage', CLASSES, where)
  no_image = records.encode_example({'image/filename': 'a.png', 'label': [1, 0, 1, 0]})
  with pytest.raises(bcss.DatasetError, match=r"\(a\.png\): feature 'image/encoded'"):
    records.decode_tile(no_image, CLASSES, where)


def test_not_a_records_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    records.open_split(str(tmp_path / 'nowhere'), 'train')
  with pytest.raises(bcss.DatasetError, match='not a converted dataset'):
    records.open_split(str(tmp_path), 'train')


def test_cli(synthetic_folder, tmp_path):
  command = [sys.executable, '-m', 'protoseg_jax.data.convert', f'--src={synthetic_folder}',
             f'--dst={tmp_path / "out"}', '--shard_size=8', '--splits=train,val', '--threads=2']
  done = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert 'train 10, val 3 tiles' in done.stdout
  assert json.loads((tmp_path / 'out' / 'dataset.json').read_text())['splits'] == ['train', 'val']
  done = subprocess.run(command[:-3] + ['--shard_size=5'], capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith('error: ') and 'refusing to mix' in done.stderr
