"""MPAMatch's programs for `python -m protoseg_jax.bench`: the train step of `config.loss.variant` on
labelled + unlabelled windows (images per step count both) and the window inference of evaluation."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from protoseg_jax import train_state
from protoseg_jax.method import Workload


def workloads(method, what: Sequence[str], batch_size: Optional[int] = None) -> list[Workload]:
  config = method.config
  size, classes = config.data.image_size, method.model.config.num_classes
  window = config.data.train_window or size
  key = jax.random.key(config.seed)
  params_shape, extra_shape = method.abstract_variables(key)
  rng = np.random.default_rng(0)

  def random_variables():
    return jax.jit(method.random_variables)(key)

  rows = []
  if 'train' in what:
    labelled = config.train.labelled_batch_size
    unlabelled = config.train.unlabelled_batch_size if method.variant != 'supervised' else 0
    trainable_shape, _ = method.split_params(params_shape)
    optimizer, schedules = method.optimizer(trainable_shape, 1000)
    step = jax.jit(train_state.guard_nonfinite(method.train_step_fn(optimizer, schedules)),
                   donate_argnums=(0,))
    state_shape = train_state.abstract_train_state(method, optimizer, key)
    batch_shape = {'x': jax.ShapeDtypeStruct((labelled, window, window, 3), jnp.uint8),
                   'y': jax.ShapeDtypeStruct((labelled, window, window), jnp.uint8)}
    if unlabelled:
      batch_shape.update(u=jax.ShapeDtypeStruct((unlabelled, window, window, 3), jnp.uint8),
                         u_ignore=jax.ShapeDtypeStruct((unlabelled, window, window), jnp.uint8))

    def train_args():
      params, extra = random_variables()
      batch = {'x': rng.integers(0, 256, (labelled, window, window, 3), np.uint8),
               'y': rng.integers(0, classes, (labelled, window, window), np.uint8)}
      if unlabelled:
        batch.update(u=rng.integers(0, 256, (unlabelled, window, window, 3), np.uint8),
                     u_ignore=np.zeros((unlabelled, window, window), np.uint8))
      state = train_state.create_train_state(params, extra, optimizer, method)
      return state, jax.tree.map(jnp.asarray, batch), jax.random.key(1)

    rows.append(Workload(f'MPAMatch train ({method.variant}, {labelled} + {unlabelled})', step,
                         (state_shape, batch_shape, jax.eval_shape(lambda: jax.random.key(0))), train_args,
                         labelled + unlabelled, donate=True))
  if 'inference' in what:
    batch = batch_size or config.eval.batch_size
    windows = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch, classes), jnp.int32)

    def inference_args():
      params, extra = random_variables()
      return (params, extra, (), jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), np.uint8)),
              jnp.full((batch, classes), -1, jnp.int32))

    rows.append(Workload(f'MPAMatch inference ({size}² windows)', jax.jit(method.scores_fn('eval')),
                         (params_shape, extra_shape, (), windows, labels), inference_args, batch))
  return rows
