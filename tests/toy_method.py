"""A tests-only method: a few lines of model behind the core's `Method` interface, touching no core file.

A frozen 1x1 "colour embedding" (not trained, not checkpointed) feeds a trainable 3x3 conv that predicts the
synthetic set's five values per pixel; the extra state counts the steps it has seen. Registered in-process
with `registry.register('toy', ToyMethod)` (`register()` below); config: `get_config()`.
"""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from protoseg_jax import config_base, metrics, registry, train_state
from protoseg_jax.data import images as images_lib, input_pipeline, segmentation_sets as sets
from protoseg_jax.method import Method, TrainData

VALUES = ('background', 'tumour', 'stroma', 'lymphocytes', 'necrosis')
PALETTE = ((255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255))


class ToyNet(nn.Module):
  num_values: int

  @nn.compact
  def __call__(self, images):
    features = nn.Conv(8, (1, 1), name='colour_embed')(images)
    return nn.Conv(self.num_values, (3, 3), padding='SAME', name='head')(jnp.tanh(features))


def get_config() -> ml_collections.ConfigDict:
  config = config_base.base_config('toy')
  config.data = ml_collections.ConfigDict(dict(
      kind='synthetic', root='', class_names=VALUES, palette=PALETTE, image_size=32, resize_to=0,
      mask_mode='index', mask_threshold=0, labelled_fraction=1.0, val_fraction=0.25, split_file='',
      split_seed=0, eval_split='val', test_split='test', decode_threads=2, mpp=1.0, ebhi_subset='gland'))
  config.data.synthetic = ml_collections.ConfigDict(dict(num_train=12, num_val=4, num_test=3, render_size=32,
                                                         seed=0, foreground_values=()))
  config.data.grain = ml_collections.ConfigDict(dict(read_threads=1, prefetch_buffer_size=2, worker_count=0,
                                                     worker_buffer_size=1))
  config.train.update(batch_size=4, steps=6, eval_every_steps=3, log_every_steps=2, learning_rate=0.05,
                      compute_dtype='float32')
  # Fault injection for the core's tests: the loss becomes NaN from this step on (-1: never); the process
  # sends itself SIGINT after this many batches were read (-1: never).
  config.train.nan_from_step = -1
  config.train.interrupt_after_batches = -1
  config.checkpoint.update(every_steps=2, keep=5, async_save=False)
  config.eval.update(batch_size=4, select_metric='mIoU')
  return config


class ToyMethod(Method):
  name = 'toy'
  frozen_collections = ('colour_embed',)

  @classmethod
  def default_config(cls):
    return get_config()

  def __init__(self, config):
    super().__init__(config)
    self.model = ToyNet(len(VALUES))

  @property
  def value_names(self):
    return list(VALUES)

  @property
  def background_value(self):
    return 0

  def param_axes(self):
    return ((r'(^|/)kernel$', (None, None, 'conv_in', 'conv_out')), (r'(^|/)bias$', ('vector',)))

  def random_variables(self, rng):
    size = self.config.data.image_size
    params = self.model.init(rng, jnp.zeros((1, size, size, 3)))['params']
    return dict(params), {'steps_seen': jnp.zeros((), jnp.int32)}

  def init_variables(self, rng):
    return jax.jit(self.random_variables)(rng)

  def optimizer(self, trainable, total_steps):
    schedule = train_state.poly_schedule(self.config.train.learning_rate, 1.0, total_steps)
    return optax.adam(schedule), {'learning_rate': schedule}

  def train_step_fn(self, optimizer, schedules):
    def step(state, batch, rng):
      del rng
      images = batch['images'].astype(jnp.float32) / 255.0

      def loss_fn(trainable):
        logits = self.model.apply({'params': {**state.frozen, **trainable}}, images)
        labels = batch['masks'].astype(jnp.int32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

      loss, grads = jax.value_and_grad(loss_fn)(state.trainable)
      nan_from = self.config.train.nan_from_step
      if nan_from >= 0:
        loss = jnp.where(state.step >= nan_from, jnp.nan, loss)
        grads = jax.tree.map(lambda g: jnp.where(state.step >= nan_from, jnp.nan, g), grads)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
      extra = {'steps_seen': state.extra['steps_seen'] + 1}
      return state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                           opt_state=opt_state, extra=extra), {'loss': loss,
                                                               'learning_rate': schedules['learning_rate'](
                                                                   state.step)}
    return step

  def _splits(self, workdir):
    root = sets.resolve_root(self.config.data, workdir)
    splits = sets.list_dataset(self.config.data, root)
    path = sets.split_path(self.config.data, workdir)
    return splits, sets.load_or_create_split(splits, self.config.data, path)

  def train_data(self, workdir, process_index, process_count):
    splits, split = self._splits(workdir)
    by_id = {pair.id: pair for pair in splits['train']}
    pairs = [by_id[i] for i in split['labelled']]

    def decode(pair):
      image, mask = sets.load_pair(pair, self.config.data)
      return {'images': image, 'masks': mask}

    batch = self.config.train.batch_size
    build = lambda start: input_pipeline.element_batches(
        pairs, decode, seed=self.config.seed, global_batch=batch, last_batch='drop',
        process_index=process_index, process_count=process_count, options=self.config.data.grain,
        start_step=start)
    interrupt_after = self.config.train.interrupt_after_batches
    return TrainData(len(pairs), input_pipeline.steps_per_epoch(len(pairs), batch, 'drop'), batch, True,
                     lambda state: _Interrupting(input_pipeline.TrainIterator(build, 0, state),
                                                 interrupt_after))

  def eval_set(self, workdir, split, process_index, process_count):
    splits, split_dict = self._splits(workdir)
    return sets.load_eval_set(sets.eval_pairs(splits, split_dict, split), self.config.data)

  def scores_fn(self, context):
    def scores(params, extra, statics, images, labels):
      del extra, statics, labels
      return jax.nn.softmax(self.model.apply({'params': params}, images.astype(jnp.float32) / 255.0), axis=-1)
    return scores

  def summarize(self, confusion, per_image):
    result = metrics.segmentation_metrics(np.asarray(confusion)[np.ix_([1, 2, 3, 4, 0], [1, 2, 3, 4, 0])],
                                          list(VALUES[1:]) + [VALUES[0]], num_tissue_classes=4)
    result['images'] = int(len(per_image))
    return result

  def export(self, params, extra, out_dir):
    from safetensors.numpy import save_file
    path = os.path.join(out_dir, 'toy.safetensors')
    kernel = np.asarray(params['head']['kernel']).transpose(3, 2, 0, 1)
    save_file({'head.weight': np.ascontiguousarray(kernel),
               'head.bias': np.asarray(params['head']['bias']),
               'steps_seen': np.asarray(extra['steps_seen'])}, path)
    return {'model': path}


class _Interrupting:
  """A train iterator that sends its own process SIGINT after `after` batches (what Ctrl-C looks like)."""

  def __init__(self, iterator, after: int):
    self._iterator, self._after, self._count = iterator, after, 0

  def __next__(self):
    batch = next(self._iterator)
    self._count += 1
    if self._count == self._after:
      os.kill(os.getpid(), signal.SIGINT)
    return batch

  def get_state(self):
    return self._iterator.get_state()

  def close(self):
    self._iterator.close()


def register() -> None:
  registry.register('toy', ToyMethod)


def read_palette_png(path: str) -> np.ndarray:
  return images_lib.read_mask(path, len(VALUES))

