"""`config.data.channel_order` reaches every path that feeds the model: the train step (device and host
augmentation) and the per-pixel scores of evaluation / predict / slides.

The reference reads tiles with OpenCV (`cv.imread`, BGR) and normalises them in that order ('bgr', the
default); 'rgb' is the order CONCH was pretrained in. The referee of the normalisation itself is the float64
formula in `tests/core/test_augment.py`; here a model fed 'bgr' tiles must be the model fed 'rgb' tiles with
the channels reversed, bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bcss  # noqa: E402  (tests/tiny_config.py puts the repository root on sys.path)
from conftest import tiny_config
from protoseg_jax import augment, train_state
from protoseg_jax.data import grain_pipeline
from protoseg_jax.methods.dualprotoseg import train
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod

LABELS = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1]], np.int32)


def config_with(**data):
  config = tiny_config()
  config.data.update(data)
  return config


@pytest.fixture(scope='module')
def setup():
  method = DualProtoSegMethod(config_with())
  params, extra = method.init_variables(jax.random.key(0))
  tiles = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
  return method, params, extra, tiles


def test_default_is_the_reference():
  assert bcss.get_config().data.channel_order == 'bgr'
  assert tiny_config().data.channel_order == 'bgr'


def test_scores_fn_feeds_the_configured_order(setup):
  method, params, extra, tiles = setup
  bank = method.inference_statics(params, extra)
  labels = jnp.asarray(LABELS)

  def scores(order, images):
    fn = jax.jit(train.make_scores_fn(method.model, config_with(channel_order=order)))
    return np.asarray(fn(params, extra, bank, jnp.asarray(images), labels))

  bgr = scores('bgr', tiles)
  np.testing.assert_array_equal(bgr, scores('rgb', np.ascontiguousarray(tiles[..., ::-1])))
  assert np.abs(bgr - scores('rgb', tiles)).max() > 1e-4            # the switch changes the input
  # The method's inference contexts (the core's evaluation, predict, slides) use its config's order.
  for context in ('eval', 'predict'):
    through_method = jax.jit(method.scores_fn(context))(params, extra, bank, jnp.asarray(tiles), labels)
    np.testing.assert_array_equal(np.asarray(through_method), bgr)


def make_step(config, params):
  """-> `batch -> (loss, trainable after one step)` of the method's train step on `config`."""
  method = DualProtoSegMethod(config)
  optimizer, schedules = method.optimizer(method.split_params(params)[0], total_steps=100)
  state = train_state.create_train_state(params, {}, optimizer, method)
  step = jax.jit(method.train_step_fn(optimizer, schedules))

  def run(images):
    new_state, metrics = step(state, {'images': jnp.asarray(images), 'labels': jnp.asarray(LABELS)},
                              jax.random.key(2))
    return float(metrics['loss']), jax.tree.map(np.asarray, new_state.trainable)

  return run


def no_flips(**data):
  config = config_with(**data)
  config.data.augment.update(hflip=False, vflip=False, rot90=False)
  return config


def test_train_step_feeds_the_configured_order_on_both_augmentation_paths(setup):
  method, params, _, tiles = setup
  bgr_loss, bgr_trainable = make_step(no_flips(channel_order='bgr'), params)(tiles)
  rgb_step = make_step(no_flips(channel_order='rgb'), params)
  rgb_loss, rgb_trainable = rgb_step(np.ascontiguousarray(tiles[..., ::-1]))
  assert bgr_loss == rgb_loss
  jax.tree.map(np.testing.assert_array_equal, bgr_trainable, rgb_trainable)
  assert abs(rgb_step(tiles)[0] - bgr_loss) > 1e-6                 # the switch changes the input

  # augment_on='host': the pipeline ships `HostAugment`'s float32 input, which the step must take as is.
  host = grain_pipeline.HostAugment.from_config(no_flips(channel_order='bgr', augment_on='host').data)
  shipped = np.stack([host({'images': tile}, np.random.default_rng(index))['images']
                      for index, tile in enumerate(tiles)])
  host_loss, host_trainable = make_step(no_flips(channel_order='bgr', augment_on='host'), params)(shipped)
  assert host_loss == pytest.approx(bgr_loss, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), host_trainable,
               bgr_trainable)


@pytest.mark.parametrize('order', ['bgr', 'rgb'])
def test_host_augment_gives_the_device_model_input(order):
  data = no_flips(channel_order=order, augment_on='host').data
  host = grain_pipeline.HostAugment.from_config(data)
  assert host.channel_order == order
  tiles = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), np.uint8)
  shipped = np.stack([host({'images': tile, 'labels': LABELS[0]}, np.random.default_rng(0))['images']
                      for tile in tiles])
  assert shipped.dtype == np.float32
  device = augment.to_model_input(jnp.asarray(tiles), data.mean, data.std, order)
  np.testing.assert_allclose(shipped, np.asarray(device), rtol=1e-6, atol=1e-6)
  # ... and both are the float64 formula (mean / std applied in the model's channel order).
  ordered = tiles[..., ::-1] if order == 'bgr' else tiles
  expected = (ordered / 255.0 - np.asarray(data.mean)) / np.asarray(data.std)
  np.testing.assert_allclose(shipped, expected, rtol=1e-6, atol=1e-6)


def test_host_pipeline_batches_are_the_device_input(tmp_path):
  """The method's own training input with `augment_on='host'` (no flips): the same examples as the device
  path, normalised in the configured order."""
  batches = {}
  for augment_on in ('device', 'host'):
    method = DualProtoSegMethod(no_flips(augment_on=augment_on))
    iterator = method.train_data(str(tmp_path), 0, 1).iterator()
    try:
      batches[augment_on] = next(iterator)
    finally:
      iterator.close()
  device, host = batches['device'], batches['host']
  assert device['images'].dtype == np.uint8 and host['images'].dtype == np.float32
  np.testing.assert_array_equal(device['labels'], host['labels'])
  data = method.config.data
  np.testing.assert_allclose(host['images'], np.asarray(augment.to_model_input(
      jnp.asarray(device['images']), data.mean, data.std, 'bgr')), rtol=1e-6, atol=1e-6)
