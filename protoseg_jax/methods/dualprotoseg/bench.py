"""DualProtoSeg's programs for `python -m protoseg_jax.bench`: the train step, one inference forward (the
level-`cam_level` class maps of one pass, bank precomputed) and the evaluation scores (all TTA passes).

Each workload has abstract arguments (for `--compile_only` accounting of full-size programs on any machine)
and a constructor of real ones (random weights and tiles) for timing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from protoseg_jax import train_state
from protoseg_jax.method import Workload
from protoseg_jax.methods.dualprotoseg import train
from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg


def workloads(method, what: Sequence[str], batch_size: Optional[int] = None) -> list[Workload]:
  config, model = method.config, method.model
  size, classes = config.data.image_size, method.num_label_classes
  key = jax.random.key(config.seed)
  rows = []
  params_shape, extra_shape = method.abstract_variables(key)

  def random_variables():
    return jax.jit(method.random_variables)(key)

  def tiles(batch):
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)

  def random_tiles(batch):
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8))

  bank_shape = jax.eval_shape(method.inference_statics, params_shape, extra_shape)
  if 'train' in what:
    train_batch = batch_size or config.train.batch_size
    trainable_shape, _ = method.split_params(params_shape)
    optimizer, schedules = method.optimizer(trainable_shape, 1000)
    step = jax.jit(train_state.guard_nonfinite(method.train_step_fn(optimizer, schedules)),
                   donate_argnums=(0,))
    state_shape = train_state.abstract_train_state(method, optimizer, key)
    batch_shape = {'images': tiles(train_batch),
                   'labels': jax.ShapeDtypeStruct((train_batch, classes), jnp.int32),
                   'valid': jax.ShapeDtypeStruct((train_batch,), jnp.bool_)}
    key_shape = jax.eval_shape(lambda: jax.random.key(0))

    def train_args():
      params, extra = random_variables()
      state = train_state.create_train_state(params, extra, optimizer, method)
      labels = np.random.default_rng(1).integers(0, 2, (train_batch, classes)).astype(np.int32)
      return state, {'images': random_tiles(train_batch), 'labels': jnp.asarray(labels),
                     'valid': jnp.ones((train_batch,), bool)}, jax.random.key(1)

    rows.append(Workload('DualProtoSeg train', step, (state_shape, batch_shape, key_shape), train_args,
                         train_batch, donate=True))
  eval_batch = batch_size or config.eval.batch_size
  level = config.eval.cam_level - 1

  def inference_args():
    params, extra = random_variables()
    return params, jax.jit(method.inference_statics)(params, extra), random_tiles(eval_batch)

  if 'inference' in what:
    def forward(params, bank, images):
      return model.apply({'params': params}, train.model_input(images, config.data), bank, level,
                         config.eval.merge, method=DualProtoSeg.class_maps)

    rows.append(Workload('DualProtoSeg inference (1 pass)', jax.jit(forward),
                         (params_shape, bank_shape, tiles(eval_batch)), inference_args, eval_batch))
  if 'tta' in what:
    scores = method.scores_fn('eval')
    labels_shape = jax.ShapeDtypeStruct((eval_batch, classes), jnp.int32)
    passes = len(config.eval.intensity_factors) * (2 if config.eval.hflip else 1)

    def tta_args():
      params, bank, images = inference_args()
      return params, {}, bank, images, jnp.ones((eval_batch, classes), jnp.int32)

    rows.append(Workload(f'DualProtoSeg eval scores ({passes} TTA passes)', jax.jit(scores),
                         (params_shape, extra_shape, bank_shape, tiles(eval_batch), labels_shape), tta_args,
                         eval_batch))
  return rows


def _conv3_pairs(side: int) -> int:
  """Input positions x kernel taps of a 3x3 'SAME' conv over a side x side map that read real input (not
  padding): the convention of XLA's cost analysis and of `costs.matmul_flops`."""
  return (3 * side - 2) ** 2


def analytic_train_flops(config) -> dict:
  """The train step's matmul / conv FLOPs (2 x MACs) by hand, per image, from the config's sizes.

  Trunk forward once (patch embedding + the blocks up to the last tap), the refiner forward on every tap and
  its backward (weight and data gradients, no data gradient into the stop-gradient taps), the pyramid
  forward and backward (its bilinear resizes are constant matrices: data gradients only), the text tower
  forward and backward to the prompt context (data gradients only, the attention twice), amortised over the
  batch. Heads (projections, scores) are left out: < 0.01 % at full size.
  """
  model, data = config.model, config.data
  vit, text = model.vit, model.text
  batch = config.train.batch_size
  side = data.image_size // vit.patch_size
  grid = side * side
  tokens = grid + (1 if vit.class_token else 0)
  width, mlp = vit.width, int(vit.width * vit.mlp_ratio)
  depth = max(vit.taps) + 1
  trunk = 2 * grid * vit.patch_size ** 2 * 3 * width + depth * (
      2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width + 2 * tokens * width * width
      + 2 * 2 * tokens * width * mlp)
  rw, feature = model.refiner_width, model.feature_dim
  taps = len(vit.taps)
  first = 2 * grid * width * rw
  per_tap = first + model.refiner_blocks * (2 * 2 * _conv3_pairs(side) * rw * rw + 2 * grid * rw * rw) \
      + 2 * grid * rw * feature
  refiner_forward = taps * per_tap
  refiner_backward = 2 * refiner_forward - taps * first
  pyramid_forward = pyramid_backward = 0
  for channels, factor in zip(model.pyramid_channels, model.pyramid_upsample):
    conv = 2 * grid * feature * channels + 2 * _conv3_pairs(side) * channels * channels
    out = side * factor
    resize = 0 if factor == 1 else 2 * out * side * side * channels + 2 * out * out * side * channels
    pyramid_forward += conv + resize
    pyramid_backward += 2 * conv + resize
  prompts = len(config.data.class_names) * model.prompts_per_class
  length, text_width = text.context_length, text.width
  rows = prompts * length
  attention = 2 * 2 * prompts * length * length * text_width
  layer = 2 * rows * text_width * 3 * text_width + attention + 2 * rows * text_width * text_width + \
      2 * 2 * rows * text_width * int(text_width * text.mlp_ratio)
  projection = 2 * prompts * text_width * text.embed_dim
  text_forward = text.depth * layer + projection
  text_backward = text.depth * (layer + attention) + projection
  parts = {'trunk forward': trunk, 'refiner forward': refiner_forward, 'refiner backward': refiner_backward,
           'pyramid forward': pyramid_forward, 'pyramid backward': pyramid_backward,
           'text forward (amortised)': text_forward / batch,
           'text backward (amortised)': text_backward / batch}
  parts['total'] = sum(parts.values())
  return parts
