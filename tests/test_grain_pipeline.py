"""Train / eval sources over records (Grain) and folders: determinism, resumption, host sharding, errors."""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from protoseg_jax.data import bcss, convert, grain_pipeline, pipeline, records, synthetic

NUM_TRAIN, NUM_VAL, SIZE = 10, 5, 32


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """(folder root, records root) of one tiny synthetic set; train shards of 4 (4 + 4 + 2)."""
  base = tmp_path_factory.mktemp('grain')
  folder = synthetic.write_bcss_layout(str(base / 'bcss'), num_train=NUM_TRAIN, num_val=NUM_VAL, num_test=1,
                                       size=SIZE, seed=5)
  converted = str(base / 'records')
  convert.convert_dataset(folder, converted, shard_size=4, threads=2)
  return folder, converted


def data_config(kind, **overrides) -> ml_collections.ConfigDict:
  config = tiny_config().data
  config.kind = kind
  config.grain.read_threads = 2
  config.grain.prefetch_buffer_size = 4
  for key, value in overrides.items():
    node, *path, leaf = [config] + key.split('.')
    for name in path:
      node = node[name]
    node[leaf] = value
  return config


def root_of(dataset, kind):
  return dataset[1] if kind == 'records' else dataset[0]


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('kind', ['records', 'folder'])
def test_same_seed_same_batches_and_resume_from_saved_state(dataset, kind):
  config = data_config(kind)
  source = pipeline.make_train_source(config, root_of(dataset, kind), 4, seed=7)
  assert (source.num_examples, source.steps_per_epoch, source.host_batch_size) == (NUM_TRAIN, 2, 4)
  uninterrupted = take(source.iterator(), 7)  # 3.5 epochs: crosses epoch boundaries
  again = pipeline.make_train_source(config, root_of(dataset, kind), 4, seed=7).iterator()
  first = take(again, 3)
  state = json.loads(json.dumps(again.get_state()))  # what a checkpoint stores
  assert state['step'] == 3
  again.close()
  resumed = pipeline.make_train_source(config, root_of(dataset, kind), 4, seed=7).iterator(state)
  assert_same_batches(first + take(resumed, 4), uninterrupted)
  resumed.close()
  first_batch = uninterrupted[0]
  assert first_batch['images'].dtype == np.uint8 and first_batch['images'].shape == (4, SIZE, SIZE, 3)
  assert first_batch['labels'].dtype == np.int32 and first_batch['labels'].shape == (4, 4)
  other_seed = take(pipeline.make_train_source(config, root_of(dataset, kind), 4, seed=8).iterator(), 2)
  assert any((a['images'] != b['images']).any() for a, b in zip(other_seed, uninterrupted))


def tile_ids(batch):
  """Each tile's identity: its raw bytes (tiles of the synthetic set are all different)."""
  return [image.tobytes() for image in batch['images']]


@pytest.mark.parametrize('kind', ['records', 'folder'])
def test_epochs_are_reshuffled_permutations_dropping_the_remainder(dataset, kind):
  source = pipeline.make_train_source(data_config(kind), root_of(dataset, kind), 4, seed=0)
  iterator = source.iterator()
  epochs = [sum((tile_ids(batch) for batch in take(iterator, 2)), []) for _ in range(3)]
  iterator.close()
  for epoch in epochs:
    assert len(set(epoch)) == 8  # 2 batches of 4, no tile twice; 2 of the 10 dropped
  assert len({tuple(epoch) for epoch in epochs}) == 3  # a new order every epoch


@pytest.mark.parametrize('kind', ['records', 'folder'])
def test_four_simulated_hosts_split_each_global_batch(dataset, kind):
  config = data_config(kind)
  single = take(pipeline.make_train_source(config, root_of(dataset, kind), 8, seed=3).iterator(), 3)
  hosts = []
  for process_index in range(4):
    source = pipeline.make_train_source(config, root_of(dataset, kind), 8, seed=3,
                                        process_index=process_index, process_count=4)
    assert source.host_batch_size == 2 and source.steps_per_epoch == 1
    hosts.append(take(source.iterator(), 3))
  for step in range(3):
    for key in ('images', 'labels'):
      np.testing.assert_array_equal(np.concatenate([host[step][key] for host in hosts]), single[step][key])


def test_records_and_folder_hold_the_same_training_tiles(dataset):
  from_records = take(pipeline.make_train_source(data_config('records'), dataset[1], 10, 0).iterator(), 1)[0]
  from_folder = take(pipeline.make_train_source(data_config('folder'), dataset[0], 10, 0).iterator(), 1)[0]
  order = lambda batch: np.argsort([image.tobytes() for image in batch['images']])
  for key in ('images', 'labels'):
    np.testing.assert_array_equal(from_records[key][order(from_records)],
                                  from_folder[key][order(from_folder)])


@pytest.mark.parametrize('kind', ['records', 'folder'])
def test_eval_every_tile_exactly_once_over_four_hosts(dataset, kind):
  config = data_config(kind)
  reference = pipeline.load_eval_set(dataset[0], 'val', 4, SIZE, 1)
  seen, batch_counts = {}, set()
  for process_index in range(4):
    source = pipeline.make_eval_source(config, root_of(dataset, kind), 'val', 4, 8, process_index, 4)
    assert source.num_examples == NUM_VAL
    batches = list(source.batches())
    batch_counts.add(len(batches))
    names = iter(source.names)
    for batch in batches:
      assert batch['images'].shape == (2, SIZE, SIZE, 3) and batch['masks'].shape == (2, SIZE, SIZE)
      assert batch['images'].dtype == np.uint8 and batch['labels'].dtype == np.int32
      for row in np.flatnonzero(batch['valid']):
        name = next(names)
        assert name not in seen
        seen[name] = {key: batch[key][row] for key in ('images', 'masks', 'labels')}
    assert next(names, None) is None
  assert batch_counts == {1}  # 5 tiles over 4 hosts: 2, 1, 1, 1 real rows, every host one batch
  assert sorted(seen) == reference.names
  for index, name in enumerate(reference.names):
    np.testing.assert_array_equal(seen[name]['images'], reference.images[index])
    np.testing.assert_array_equal(seen[name]['masks'], reference.masks[index])
    np.testing.assert_array_equal(seen[name]['labels'], reference.labels[index])


def test_eval_more_hosts_than_tiles_pad_with_invalid_batches(dataset):
  config = data_config('records')
  counts = []
  for process_index in range(8):
    source = pipeline.make_eval_source(config, dataset[1], 'val', 4, 8, process_index, 8)
    batches = list(source.batches())
    assert len(batches) == 1
    counts.append(int(batches[0]['valid'].sum()))
  assert counts == [1, 1, 1, 1, 1, 0, 0, 0]


def test_load_eval_set_reads_records_identically(dataset):
  from_folder = pipeline.load_eval_set(dataset[0], 'val', 4, SIZE, 2)
  from_records = pipeline.load_eval_set(dataset[1], 'val', 4, SIZE, 2)
  assert from_records.names == from_folder.names
  for key in ('images', 'masks', 'labels'):
    np.testing.assert_array_equal(getattr(from_records, key), getattr(from_folder, key))


def test_host_augmentation(dataset):
  plain = data_config('records', augment_on='host', **{'augment.hflip': False, 'augment.vflip': False,
                                                       'augment.rot90': False})
  uint8 = take(pipeline.make_train_source(data_config('records'), dataset[1], 4, 0).iterator(), 2)
  normalised = take(pipeline.make_train_source(plain, dataset[1], 4, 0).iterator(), 2)
  mean, std = np.asarray(plain.mean, np.float64), np.asarray(plain.std, np.float64)
  for raw, batch in zip(uint8, normalised):
    assert batch['images'].dtype == np.float32
    np.testing.assert_allclose(batch['images'], (raw['images'] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
  augmented_config = data_config('records', augment_on='host')
  augmented = take(pipeline.make_train_source(augmented_config, dataset[1], 4, 0).iterator(), 2)
  transformed = 0
  for raw, batch in zip(uint8, augmented):
    for image, result in zip(raw['images'], batch['images']):
      variants = [np.rot90(flipped, k) for flipped in (image, image[:, ::-1]) for k in range(4)]
      matches = [np.allclose(result, (v / 255.0 - mean) / std, atol=1e-5) for v in variants]
      assert any(matches)  # one of the 8 dihedral transforms of the tile
      transformed += not matches[0]
  assert transformed > 0
  again = take(pipeline.make_train_source(augmented_config, dataset[1], 4, 0).iterator(), 2)
  assert_same_batches(augmented, again)
  folder = take(pipeline.make_train_source(data_config('folder', augment_on='host'), dataset[0], 4, 0)
                .iterator(), 1)[0]
  assert folder['images'].dtype == np.float32 and folder['images'].shape == (4, SIZE, SIZE, 3)


def test_host_flip_rotate_matches_the_device_version():
  import jax

  from protoseg_jax import augment

  image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
  device = np.asarray(augment.flip_rotate(jax.random.key(0), np.stack([image] * 64)))
  host = [grain_pipeline.host_flip_rotate(image, np.random.default_rng(i)) for i in range(64)]
  as_set = lambda images: {i.tobytes() for i in images}
  assert as_set(host) == as_set(device) and len(as_set(host)) == 8  # the same 8 outcomes


def test_worker_processes_give_the_same_batches_and_state(dataset):
  config = data_config('records')
  reference = take(pipeline.make_train_source(config, dataset[1], 4, 1).iterator(), 5)
  config.grain.worker_count = 2
  workers = pipeline.make_train_source(config, dataset[1], 4, 1).iterator()
  first = take(workers, 2)
  state = json.loads(json.dumps(workers.get_state()))
  workers.close()
  assert state['worker_count'] == 2 and 'grain' in state
  resumed = pipeline.make_train_source(config, dataset[1], 4, 1).iterator(state)
  assert_same_batches(first + take(resumed, 3), reference)
  resumed.close()
  config.grain.worker_count = 0  # a different worker count restarts the stream at the saved step
  assert_same_batches(take(pipeline.make_train_source(config, dataset[1], 4, 1).iterator(state), 3),
                      reference[2:])


def test_config_and_data_errors(dataset, tmp_path):
  config = data_config('records')
  with pytest.raises(ValueError, match='config.train.batch_size=6 must be a positive multiple'):
    pipeline.make_train_source(config, dataset[1], 6, 0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='config.eval.batch_size=6'):
    pipeline.make_eval_source(config, dataset[1], 'val', 4, 6, 0, 4)
  with pytest.raises(bcss.DatasetError, match=r'train split has 10 tiles, fewer than one batch of 12 '
                                              r'\(config.train.batch_size\)'):
    pipeline.make_train_source(config, dataset[1], 12, 0)
  with pytest.raises(bcss.DatasetError, match=r'train\.manifest\.json: tiles are 32x32, expected 64x64 '
                                              r'\(config.data.image_size\)'):
    pipeline.make_train_source(data_config('records', image_size=64), dataset[1], 4, 0)
  with pytest.raises(bcss.DatasetError, match=r'converted with 4 classes .*config.data.class_names has 3'):
    pipeline.make_train_source(data_config('records', class_names=('A', 'B', 'C')), dataset[1], 4, 0)
  with pytest.raises(ValueError, match='config.data.augment_on'):
    pipeline.make_train_source(data_config('records', augment_on='gpu'), dataset[1], 4, 0)
  with pytest.raises(FileNotFoundError, match=r'config.data.root'):
    pipeline.resolve_root(data_config('records', root=str(tmp_path / 'absent')), str(tmp_path))
  with pytest.raises(bcss.DatasetError, match='holds converted records: set config.data.kind=records'):
    pipeline.make_train_source(data_config('folder'), dataset[1], 4, 0)
  with pytest.raises(ValueError, match='config.data.kind'):
    pipeline.resolve_root(data_config('tfds'), str(tmp_path))


def test_bad_record_surfaces_through_the_pipeline_naming_the_shard(dataset, tmp_path):
  """A record whose label has the wrong length, in an otherwise valid shard, fails the training iterator."""
  root = str(tmp_path / 'bad')
  shutil.copytree(dataset[1], root)
  split = records.open_split(root, 'train')
  tiles = list(records.read_split_tiles(split))[4:8]  # shard 1
  path = os.path.join(root, 'train.array_record-00001-of-00003')
  os.remove(path)
  writer = records.ShardWriter({records.ARRAY_RECORD: records.epath.Path(path)})
  for index, tile in enumerate(tiles):
    if index == 2:
      tile = records.TileRecord(tile.name, tile.image_bytes, tile.image_format, tile.label[:3], tile.height,
                                tile.width)
    writer.write(records.encode_tile(tile))
  writer.close()
  iterator = pipeline.make_train_source(data_config('records'), root, 10, 0).iterator()
  with pytest.raises(bcss.DatasetError, match=r'train\.array_record-00001-of-00003: record 2 '
                                              r'\(synth_00006.*\): label \[.*\] must be 4 values'):
    next(iterator)
  iterator.close()


def test_synthetic_set_written_as_records(tmp_path):
  config = data_config('synthetic', root='', **{'synthetic.format': 'records', 'synthetic.num_train': 4,
                                                'synthetic.num_val': 2, 'synthetic.num_test': 0})
  root = pipeline.resolve_root(config, str(tmp_path))
  assert root == os.path.join(str(tmp_path), 'synthetic_bcss_records')
  assert pipeline.resolve_root(config, str(tmp_path)) == root  # second call: reused, nothing rewritten
  assert json.loads(open(os.path.join(root, 'dataset.json')).read())['splits'] == ['train', 'val']
  source = pipeline.make_train_source(config, root, 4, 0)
  assert source.steps_per_epoch == 1
  evaluation = pipeline.make_eval_source(config, root, 'val', 4, 2)
  assert evaluation.names == sorted(os.listdir(os.path.join(str(tmp_path), 'synthetic_bcss', 'val', 'img')))
