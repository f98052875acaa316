"""Training batches of `input_pipeline.element_batches` over records and folder sources (`tile_sets`), and the
evaluation tiles of `tile_sets.eval_tiles`: determinism, resumption, per-epoch order, host sharding, errors.

Referees: NumPy's `default_rng([seed, epoch]).permutation` for the order, and the synthetic generator
(`synthetic.render_tile`) for the contents of every tile.
"""

import json
import os
import shutil

import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from protoseg_jax.data import convert, grain_pipeline, input_pipeline, records, synthetic, tile_sets
from protoseg_jax.errors import ConfigError, DatasetError

NUM_TRAIN, NUM_VAL, SIZE, SET_SEED = 10, 5, 32, 5


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """(folder root, records root) of one tiny synthetic set; train shards of 4 (4 + 4 + 2)."""
  base = tmp_path_factory.mktemp('grain')
  folder = synthetic.write_bcss_layout(str(base / 'bcss'), num_train=NUM_TRAIN, num_val=NUM_VAL, num_test=1,
                                       size=SIZE, seed=SET_SEED)
  converted = str(base / 'records')
  convert.convert_dataset(folder, converted, shard_size=4, threads=2)
  return folder, converted


def rendered(split, index):
  """(image, mask, label) of synthetic tile `index` of `split`, straight from the generator."""
  rng = synthetic._tile_rng(SET_SEED, split, index)  # pylint: disable=protected-access
  image, mask = synthetic.render_tile(rng, SIZE)
  while split == 'train' and not (mask < 4).any():  # as the writer: a training tile has a tissue class
    image, mask = synthetic.render_tile(rng, SIZE)
  return image, mask, np.array([(mask == c).any() for c in range(4)], np.int32)


@pytest.fixture(scope='module')
def train_tiles():
  """The training tiles in file (= record) order: images `[N, S, S, 3]`, labels `[N, 4]`."""
  tiles = [rendered('train', index) for index in range(NUM_TRAIN)]
  return np.stack([t[0] for t in tiles]), np.stack([t[2] for t in tiles])


def data_config(kind, **overrides) -> ml_collections.ConfigDict:
  config = tiny_config().data
  config.kind = kind
  config.last_partial_batch = 'drop'
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


def train_iterator(config, root, global_batch, seed, process_index=0, process_count=1, state=None):
  """This host's batches of `element_batches` over `tile_sets.train_source`, as a `TrainIterator`."""
  source, decode, _ = tile_sets.train_source(config, root)
  host_transform = grain_pipeline.HostAugment.from_config(config) if config.augment_on == 'host' else None

  def build(start_step):
    return input_pipeline.element_batches(
        source, decode, seed=seed, global_batch=global_batch, last_batch=config.last_partial_batch,
        process_index=process_index, process_count=process_count, options=config.grain,
        start_step=start_step, host_transform=host_transform, transform_seed=seed)

  return input_pipeline.TrainIterator(build, config.grain.worker_count, state)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def tile_index(image, train_images):
  """Position of `image` among the training tiles (all different), or -1."""
  matches = np.flatnonzero((train_images == image).all(axis=(1, 2, 3)))
  return int(matches[0]) if len(matches) == 1 else -1


@pytest.mark.parametrize('kind', ['records', 'folder'])
def test_same_seed_same_batches_and_resume_from_saved_state(dataset, kind):
  config = data_config(kind)
  _, _, count = tile_sets.train_source(config, root_of(dataset, kind))
  assert count == NUM_TRAIN and input_pipeline.steps_per_epoch(count, 4, 'drop') == 2
  iterator = train_iterator(config, root_of(dataset, kind), 4, seed=7)
  uninterrupted = take(iterator, 7)  # 3.5 epochs: crosses epoch boundaries
  iterator.close()
  again = train_iterator(config, root_of(dataset, kind), 4, seed=7)
  first = take(again, 3)
  state = json.loads(json.dumps(again.get_state()))  # what a checkpoint stores
  assert state['step'] == 3
  again.close()
  resumed = train_iterator(config, root_of(dataset, kind), 4, seed=7, state=state)
  assert_same_batches(first + take(resumed, 4), uninterrupted)
  resumed.close()
  step_only = train_iterator(config, root_of(dataset, kind), 4, seed=7, state={'step': 3})
  assert_same_batches(take(step_only, 4), uninterrupted[3:])  # a multi-host checkpoint keeps the step only
  step_only.close()
  first_batch = uninterrupted[0]
  assert first_batch.keys() == {'images', 'labels', 'valid'}
  assert first_batch['images'].dtype == np.uint8 and first_batch['images'].shape == (4, SIZE, SIZE, 3)
  assert first_batch['labels'].dtype == np.int32 and first_batch['labels'].shape == (4, 4)
  assert first_batch['valid'].dtype == bool and all(batch['valid'].all() for batch in uninterrupted)
  other = train_iterator(config, root_of(dataset, kind), 4, seed=8)
  other_seed = take(other, 2)
  other.close()
  assert any((a['images'] != b['images']).any() for a, b in zip(other_seed, uninterrupted))


@pytest.mark.parametrize('kind', ['records', 'folder'])
@pytest.mark.parametrize('last_batch', ['drop', 'keep'])
def test_each_epoch_is_the_numpy_permutation_of_the_examples(dataset, train_tiles, kind, last_batch):
  """Epoch e is `default_rng([seed, e]).permutation(10)` in batches of 4: 'drop' leaves out its last 2,
  'keep' shows all 10 once and pads the third batch with 2 `valid=False` rows."""
  seed, batch_size = 11, 4
  steps = 2 if last_batch == 'drop' else 3
  iterator = train_iterator(data_config(kind, last_partial_batch=last_batch), root_of(dataset, kind),
                            batch_size, seed)
  batches = take(iterator, 3 * steps)
  iterator.close()
  images, labels = train_tiles
  orders = []
  for epoch in range(3):
    epoch_batches = batches[epoch * steps:(epoch + 1) * steps]
    valid = np.concatenate([batch['valid'] for batch in epoch_batches])
    rows = np.concatenate([batch['images'] for batch in epoch_batches])[valid]
    seen = [tile_index(image, images) for image in rows]
    permutation = np.random.default_rng([seed, epoch]).permutation(NUM_TRAIN)
    if last_batch == 'drop':
      assert valid.all() and seen == list(permutation[:8])
    else:
      assert list(valid) == [True] * 10 + [False] * 2 and seen == list(permutation)
      assert sorted(seen) == list(range(NUM_TRAIN))
    np.testing.assert_array_equal(np.concatenate([batch['labels'] for batch in epoch_batches])[valid],
                                  labels[seen])
    orders.append(tuple(seen))
  assert len(set(orders)) == 3  # a new order every epoch


@pytest.mark.parametrize('kind', ['records', 'folder'])
@pytest.mark.parametrize('last_batch', ['drop', 'keep'])
def test_four_simulated_hosts_split_each_global_batch(dataset, kind, last_batch):
  """Host p of 4 gets rows [2p, 2p + 2) of each global batch of 8 ('keep': the padding rows too)."""
  config = data_config(kind, last_partial_batch=last_batch)
  single_iterator = train_iterator(config, root_of(dataset, kind), 8, seed=3)
  single = take(single_iterator, 3)
  single_iterator.close()
  assert input_pipeline.steps_per_epoch(NUM_TRAIN, 8, last_batch) == (1 if last_batch == 'drop' else 2)
  hosts = []
  for process_index in range(4):
    iterator = train_iterator(config, root_of(dataset, kind), 8, seed=3, process_index=process_index,
                              process_count=4)
    hosts.append(take(iterator, 3))
    iterator.close()
  assert all(batch['images'].shape == (2, SIZE, SIZE, 3) for host in hosts for batch in host)
  for step in range(3):
    for key in ('images', 'labels', 'valid'):
      for process_index, host in enumerate(hosts):
        np.testing.assert_array_equal(host[step][key],
                                      single[step][key][2 * process_index:2 * process_index + 2])
  if last_batch == 'keep':
    assert [int(batch['valid'].sum()) for batch in single] == [8, 2, 8]


def test_records_and_folder_hold_the_same_training_tiles(dataset, train_tiles):
  batches = {}
  for kind in ('records', 'folder'):
    iterator = train_iterator(data_config(kind), root_of(dataset, kind), 10, 0)
    batches[kind] = next(iterator)
    iterator.close()
  permutation = np.random.default_rng([0, 0]).permutation(NUM_TRAIN)
  for batch in batches.values():
    np.testing.assert_array_equal(batch['images'], train_tiles[0][permutation])
    np.testing.assert_array_equal(batch['labels'], train_tiles[1][permutation])


@pytest.mark.parametrize('kind', ['records', 'folder'])
def test_eval_every_tile_exactly_once_over_four_hosts(dataset, kind):
  config = data_config(kind)
  seen = {}
  for process_index in range(4):
    eval_set = tile_sets.eval_tiles(config, root_of(dataset, kind), 'val', 4, process_index, 4)
    assert eval_set.num_examples == NUM_VAL and eval_set.per_host
    indices = list(range(process_index, NUM_VAL, 4))  # host p: tiles p, p + 4, ...
    assert eval_set.names == [f'synth_val_{index:05d}.png' for index in indices]
    assert eval_set.labels.dtype == np.int32 and eval_set.labels.shape == (len(indices), 4)
    for row, name in enumerate(eval_set.names):
      assert name not in seen
      seen[name] = (eval_set.images[row], eval_set.masks[row], eval_set.labels[row])
  assert sorted(seen) == [f'synth_val_{index:05d}.png' for index in range(NUM_VAL)]
  for index in range(NUM_VAL):
    image, mask, label = seen[f'synth_val_{index:05d}.png']
    assert image.dtype == np.uint8 and mask.dtype == np.uint8
    for got, expected in zip((image, mask, label), rendered('val', index)):
      np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize('kind', ['records', 'folder'])
def test_eval_more_hosts_than_tiles_leaves_the_last_hosts_empty(dataset, kind):
  counts = []
  for process_index in range(8):
    eval_set = tile_sets.eval_tiles(data_config(kind), root_of(dataset, kind), 'val', 4, process_index, 8)
    assert eval_set.num_examples == NUM_VAL and eval_set.labels.shape == (len(eval_set.names), 4)
    counts.append(len(eval_set.names))
    assert eval_set.names == ([f'synth_val_{process_index:05d}.png'] if process_index < NUM_VAL else [])
  assert counts == [1, 1, 1, 1, 1, 0, 0, 0]


def test_eval_tiles_read_records_identically(dataset):
  from_folder = tile_sets.eval_tiles(data_config('folder'), dataset[0], 'val', 4)
  from_records = tile_sets.eval_tiles(data_config('records'), dataset[1], 'val', 4)
  assert from_records.names == from_folder.names and len(from_folder.names) == NUM_VAL
  assert not from_folder.per_host and from_records.num_examples == NUM_VAL
  for key in ('images', 'masks', 'labels'):
    np.testing.assert_array_equal(np.stack(getattr(from_records, key)), np.stack(getattr(from_folder, key)))


def test_host_augmentation(dataset):
  uint8 = take(train_iterator(data_config('records'), dataset[1], 4, 0), 2)
  no_flips = {'augment.hflip': False, 'augment.vflip': False, 'augment.rot90': False}
  mean, std = np.asarray(data_config('records').mean, np.float64), np.asarray(data_config('records').std)
  for channel_order in ('rgb', 'bgr'):  # the model's channel order; mean / std are given in it
    plain = data_config('records', augment_on='host', channel_order=channel_order, **no_flips)
    normalised = take(train_iterator(plain, dataset[1], 4, 0), 2)
    for raw, batch in zip(uint8, normalised):
      ordered = raw['images'][..., ::-1] if channel_order == 'bgr' else raw['images']
      assert batch['images'].dtype == np.float32
      np.testing.assert_allclose(batch['images'], (ordered / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(batch['labels'], raw['labels'])
  augmented_config = data_config('records', augment_on='host', channel_order='rgb')
  augmented = take(train_iterator(augmented_config, dataset[1], 4, 0), 2)
  transformed = 0
  for raw, batch in zip(uint8, augmented):
    for image, result in zip(raw['images'], batch['images']):
      variants = [np.rot90(flipped, k) for flipped in (image, image[:, ::-1]) for k in range(4)]
      matches = [np.allclose(result, (v / 255.0 - mean) / std, atol=1e-5) for v in variants]
      assert any(matches)  # one of the 8 dihedral transforms of the tile
      transformed += not matches[0]
  assert transformed > 0
  again = take(train_iterator(augmented_config, dataset[1], 4, 0), 2)
  assert_same_batches(augmented, again)
  # The draws follow the global row, not the host: two hosts see the single host's augmented rows.
  halves = [take(train_iterator(augmented_config, dataset[1], 4, 0, process_index=p, process_count=2), 2)
            for p in range(2)]
  for step, batch in enumerate(augmented):
    np.testing.assert_array_equal(np.concatenate([half[step]['images'] for half in halves]), batch['images'])
  folder = next(train_iterator(data_config('folder', augment_on='host'), dataset[0], 4, 0))
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
  reference_iterator = train_iterator(config, dataset[1], 4, 1)
  reference = take(reference_iterator, 5)
  reference_iterator.close()
  config.grain.worker_count = 2
  workers = train_iterator(config, dataset[1], 4, 1)
  first = take(workers, 2)
  state = json.loads(json.dumps(workers.get_state()))
  workers.close()
  assert state['worker_count'] == 2 and 'grain' in state and state['step'] == 2
  resumed = train_iterator(config, dataset[1], 4, 1, state=state)
  assert_same_batches(first + take(resumed, 3), reference)
  resumed.close()
  config.grain.worker_count = 0  # a different worker count restarts the stream at the saved step
  restarted = train_iterator(config, dataset[1], 4, 1, state=state)
  assert_same_batches(take(restarted, 3), reference[2:])
  restarted.close()


def test_config_and_data_errors(dataset, tmp_path):
  config = data_config('records')
  with pytest.raises(ValueError, match='config.train.batch_size=6 must be a positive multiple'):
    train_iterator(config, dataset[1], 6, 0, process_index=0, process_count=4)
  with pytest.raises(DatasetError, match=r'training split has 10 examples, fewer than one batch of 12 '
                                         r'\(config.train.batch_size\)'):
    train_iterator(config, dataset[1], 12, 0)
  with pytest.raises(DatasetError, match=r'train\.manifest\.json: tiles are 32x32, expected 64x64 '
                                         r'\(config.data.image_size\)'):
    tile_sets.train_source(data_config('records', image_size=64), dataset[1])
  with pytest.raises(DatasetError, match=r'converted with 4 classes .*config.data.class_names has 3'):
    tile_sets.train_source(data_config('records', class_names=('A', 'B', 'C')), dataset[1])
  with pytest.raises(DatasetError, match=r'records directory not found: .*absent \(config.data.root\)'):
    tile_sets.resolve_root(data_config('records', root=str(tmp_path / 'absent')), str(tmp_path))
  with pytest.raises(DatasetError, match='holds converted records: set config.data.kind=records'):
    tile_sets.resolve_root(data_config('folder', root=dataset[1]), str(tmp_path))
  with pytest.raises(ConfigError, match='config.data.kind'):
    tile_sets.resolve_root(data_config('tfds'), str(tmp_path))
  with pytest.raises(ValueError, match=r'config.data.last_partial_batch must be one of'):
    train_iterator(data_config('records', last_partial_batch='pad'), dataset[1], 4, 0)
  # The checks of the method that builds its batches with this pipeline.
  from protoseg_jax.methods.dualprotoseg import method as dualprotoseg  # pylint: disable=g-import-not-at-top

  def method_train_data(batch_size, **overrides):
    full = tiny_config()
    full.data = data_config('records', root=dataset[1], **overrides)
    full.train.batch_size = batch_size
    return dualprotoseg.DualProtoSegMethod(full).train_data(str(tmp_path), 0, 1)

  with pytest.raises(DatasetError, match=r'train(ing)? split has 10 tiles, fewer than one batch of 12 '
                                         r'\(config.train.batch_size\)'):
    method_train_data(12)
  with pytest.raises(ConfigError, match='config.data.augment_on'):
    method_train_data(4, augment_on='gpu')
  train_data = method_train_data(4, last_partial_batch='keep')
  assert (train_data.num_examples, train_data.steps_per_epoch, train_data.host_rows) == (10, 3, True)


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
  iterator = train_iterator(data_config('records'), root, 10, 0)
  with pytest.raises(DatasetError, match=r'train\.array_record-00001-of-00003: record 2 '
                                         r'\(synth_00006.*\): label \[.*\] must be 4 values'):
    next(iterator)
  iterator.close()


def test_synthetic_set_written_as_records(tmp_path):
  config = data_config('synthetic', root='', **{'synthetic.format': 'records', 'synthetic.num_train': 4,
                                                'synthetic.num_val': 2, 'synthetic.num_test': 0})
  root = tile_sets.resolve_root(config, str(tmp_path))
  assert root == os.path.join(str(tmp_path), 'synthetic_bcss_records')
  assert tile_sets.resolve_root(config, str(tmp_path)) == root  # second call: reused, nothing rewritten
  assert json.loads(open(os.path.join(root, 'dataset.json')).read())['splits'] == ['train', 'val']
  assert records.is_records_dir(root) and tile_sets.uses_records(config)
  source, _, count = tile_sets.train_source(config, root)
  assert count == 4 and len(source) == 4 and input_pipeline.steps_per_epoch(count, 4, 'drop') == 1
  batch = next(train_iterator(config, root, 4, 0))
  assert batch['images'].shape == (4, SIZE, SIZE, 3) and batch['valid'].all()
  evaluation = tile_sets.eval_tiles(config, root, 'val', 4)
  assert evaluation.names == sorted(os.listdir(os.path.join(str(tmp_path), 'synthetic_bcss', 'val', 'img')))
  assert evaluation.num_examples == 2
