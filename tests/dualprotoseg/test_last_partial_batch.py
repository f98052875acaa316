"""`config.data.last_partial_batch`: 'keep' (the reference: its `DataLoader` has no `drop_last`, so the last,
smaller batch of an epoch is trained on) or 'drop'.

Kept, the last batch is padded to the full size (one compiled shape) with rows flagged `valid=False`, and
the loss is the loss of the real rows alone, as the reference's smaller batch: checked on the pipeline
(every example exactly once per epoch), the loss (hand-computed float64), its gradient and the train step.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import bcss  # noqa: E402  (tests/tiny_config.py puts the repository root on sys.path)
from conftest import tiny_config
from protoseg_jax import train_state
from protoseg_jax.data import input_pipeline
from protoseg_jax.methods.dualprotoseg import train
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod

OPTIONS = ml_collections.ConfigDict(dict(read_threads=1, prefetch_buffer_size=1, worker_count=0,
                                         worker_buffer_size=1))


def test_default_and_steps_per_epoch_on_bcss_wsss():
  assert bcss.get_config().data.last_partial_batch == 'keep'
  # BCSS-WSSS training split: 23,422 tiles, batch 64.
  assert input_pipeline.steps_per_epoch(23422, 64, 'keep') == 366
  assert input_pipeline.steps_per_epoch(23422, 64, 'drop') == 365
  assert input_pipeline.steps_per_epoch(23424, 64, 'keep') == 366   # no partial batch: the same
  with pytest.raises(ValueError, match='config.data.last_partial_batch'):
    input_pipeline.steps_per_epoch(10, 4, 'pad')


def batches(last_batch, count, process_index=0, process_count=1, num_examples=10, global_batch=4):
  source = list(range(num_examples))
  decode = lambda i: {'index': np.int32(i), 'images': np.full((2, 2, 3), i, np.uint8)}
  iterator = iter(input_pipeline.element_batches(
      source, decode, seed=3, global_batch=global_batch, last_batch=last_batch,
      process_index=process_index, process_count=process_count, options=OPTIONS))
  return [next(iterator) for _ in range(count)]


def test_keep_pads_the_last_batch_and_sees_every_example_once():
  epoch = batches('keep', 3)
  valid = np.stack([batch['valid'] for batch in epoch])
  assert valid.dtype == bool and valid.shape == (3, 4)
  np.testing.assert_array_equal(valid, [[True] * 4, [True] * 4, [True, True, False, False]])
  index = np.stack([batch['index'] for batch in epoch])
  assert sorted(index[valid].tolist()) == list(range(10))             # every example exactly once
  assert set(index[~valid].tolist()) <= set(range(10))                # padding: real tiles, masked out
  for batch in epoch:
    assert batch['images'].shape == (4, 2, 2, 3)                       # one shape for every step
    np.testing.assert_array_equal(batch['images'][:, 0, 0, 0], batch['index'])
  next_epoch = batches('keep', 6)[3:]
  assert all(batch['valid'].all() for batch in next_epoch[:2])
  assert sorted(np.concatenate([b['index'][b['valid']] for b in next_epoch]).tolist()) == list(range(10))


def test_drop_skips_the_last_batch():
  epoch = batches('drop', 2)
  assert all(batch['valid'].all() for batch in epoch)
  index = np.concatenate([batch['index'] for batch in epoch])
  assert len(set(index.tolist())) == 8                                 # two examples left out this epoch
  assert batches('drop', 3)[2]['index'].tolist() != epoch[0]['index'].tolist()  # the next epoch begins


def test_two_hosts_split_each_padded_global_batch():
  single = batches('keep', 3)
  hosts = [batches('keep', 3, process_index=p, process_count=2) for p in range(2)]
  for step, whole in enumerate(single):
    for key in ('index', 'valid'):
      np.testing.assert_array_equal(np.concatenate([hosts[0][step][key], hosts[1][step][key]]), whole[key])


@pytest.mark.parametrize('last_batch, steps, rows', [('keep', 5, 18), ('drop', 4, 16)])
def test_method_training_input_follows_the_switch(tmp_path, last_batch, steps, rows):
  config = tiny_config()
  config.data.synthetic.num_train = 18                                 # batch 4: 4 whole batches + 2 tiles
  config.data.last_partial_batch = last_batch
  data = DualProtoSegMethod(config).train_data(str(tmp_path), 0, 1)
  assert data.steps_per_epoch == steps and data.num_examples == 18
  iterator = data.iterator()
  try:
    epoch = [next(iterator) for _ in range(steps)]
  finally:
    iterator.close()
  assert sum(int(batch['valid'].sum()) for batch in epoch) == rows
  assert all(batch['images'].shape[0] == 4 for batch in epoch)


def bce64(x, y):
  return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def test_padded_loss_is_the_real_rows_loss_and_padding_gets_no_gradient():
  rng = np.random.default_rng(7)
  num_classes, levels = 4, 4
  scores = rng.normal(size=(levels, 4, num_classes * 3))               # [L, B, P], 3 prototypes per class
  scores[:, 2:] *= 50.0                                                # padding rows: anything at all
  labels = np.array([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
  valid = np.array([True, True, False, False])
  weights = np.array([1.0, 0.5, 2.0, 1.0])
  # float64 referee on the two real rows: BCE-with-logits of the mean-merged class scores.
  real = scores[:, :2].reshape(levels, 2, num_classes, 3).mean(-1)
  per_level = bce64(real, labels[:2]).mean(axis=(1, 2))

  def loss(level_scores):
    return train.multiscale_bce(level_scores, jnp.asarray(labels), num_classes, 'mean',
                                jnp.asarray(weights, jnp.float32), jnp.asarray(valid))

  value, levels_out = loss(jnp.asarray(scores, jnp.float32))
  np.testing.assert_allclose(np.asarray(levels_out), per_level, rtol=1e-5)
  np.testing.assert_allclose(float(value), (weights * per_level).sum(), rtol=1e-5)
  grad = np.asarray(jax.grad(lambda s: loss(s)[0])(jnp.asarray(scores, jnp.float32)))
  np.testing.assert_array_equal(grad[:, 2:], 0.0)
  assert np.abs(grad[:, :2]).min() > 0
  # Without `valid` the padding would count.
  unmasked, _ = train.multiscale_bce(jnp.asarray(scores, jnp.float32), jnp.asarray(labels), num_classes,
                                     'mean', jnp.asarray(weights, jnp.float32))
  assert abs(float(unmasked) - float(value)) > 1e-2
  # The diversity term skips padding rows too.
  cam = jnp.asarray(rng.normal(size=(4, 3, 3, num_classes * 3)), jnp.float32)
  np.testing.assert_allclose(
      float(train.prototype_diversity(cam, jnp.asarray(labels), num_classes, jnp.asarray(valid))),
      float(train.prototype_diversity(cam[:2], jnp.asarray(labels[:2]), num_classes)), rtol=1e-6)


def test_train_step_ignores_the_padding_rows():
  config = tiny_config()
  method = DualProtoSegMethod(config)
  params, extra = method.init_variables(jax.random.key(0))
  optimizer, schedules = method.optimizer(method.split_params(params)[0], total_steps=100)
  state = train_state.create_train_state(params, extra, optimizer, method)
  step = jax.jit(method.train_step_fn(optimizer, schedules))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 32, 32, 3), np.uint8)
  labels = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1]], np.int32)
  other_images, other_labels = images.copy(), labels.copy()
  other_images[2:] = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
  other_labels[2:] = 1 - labels[2:]

  def run(images, labels, valid):
    new_state, metrics = step(state, {'images': jnp.asarray(images), 'labels': jnp.asarray(labels),
                                      'valid': jnp.asarray(valid)}, jax.random.key(1))
    return float(metrics['loss']), jax.tree.map(np.asarray, new_state.trainable)

  padded = np.array([True, True, False, False])
  loss, trainable = run(images, labels, padded)
  other_loss, other_trainable = run(other_images, other_labels, padded)
  assert loss == other_loss
  jax.tree.map(np.testing.assert_array_equal, trainable, other_trainable)
  # With every row valid, the same change of rows 2-3 does change the step.
  every = np.ones(4, bool)
  assert abs(run(images, labels, every)[0] - run(other_images, other_labels, every)[0]) > 1e-4
