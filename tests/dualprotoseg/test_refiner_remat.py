"""`config.model.refiner_remat` (per-block rematerialisation of the refiner) changes memory, not numbers: the
same parameter tree and bitwise the same loss, gradients and updated state as without it, dropout on."""

import jax
import jax.numpy as jnp
import numpy as np

import tiny_config
from protoseg_jax import train_state
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod


def _one_step(remat: bool):
  config = tiny_config.get_config()
  config.model.update(refiner_remat=remat, refiner_blocks=2, refiner_dropout=0.3)
  method = DualProtoSegMethod(config)
  params, extra = method.init_variables(jax.random.key(0))
  optimizer, schedules = method.optimizer(method.split_params(params)[0], 10)
  state = train_state.create_train_state(params, extra, optimizer, method)
  rng = np.random.default_rng(0)
  batch = {'images': jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3), np.uint8)),
           'labels': jnp.asarray(rng.integers(0, 2, (4, 4)), jnp.int32), 'valid': jnp.ones((4,), bool)}
  new_state, metrics = jax.jit(method.train_step_fn(optimizer, schedules))(state, batch, jax.random.key(1))
  return state, new_state, metrics


def test_remat_is_bitwise_the_same_step():
  before_plain, plain, plain_metrics = _one_step(False)
  before_remat, remat, remat_metrics = _one_step(True)
  assert jax.tree.structure(before_plain.trainable) == jax.tree.structure(before_remat.trainable)
  assert 'block1_conv2' in before_remat.trainable['shared_decoder']
  assert float(plain_metrics['loss']) == float(remat_metrics['loss'])
  for want, got in zip(jax.tree.leaves((plain.trainable, plain.opt_state)),
                       jax.tree.leaves((remat.trainable, remat.opt_state))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_remat_saves_the_blocks_norm_intermediates():
  """Fewer bytes saved for the backward pass: the residuals XLA must keep between forward and backward."""
  from jax._src import ad_checkpoint  # the saved-residual listing of jax.checkpoint's debugging tools

  sizes = {}
  for remat in (False, True):
    config = tiny_config.get_config()
    config.model.update(refiner_remat=remat, refiner_blocks=2)
    method = DualProtoSegMethod(config)
    params, _ = method.init_variables(jax.random.key(0))
    model = method.model
    taps = jnp.zeros((4, 4, 4, 4, 32))

    def loss(trainable):
      scores, _ = model.apply({'params': {**params, **trainable}}, taps, jnp.asarray(method.prompt_ids), False,
                              method=type(model).head_scores)
      return jnp.sum(scores)

    residuals = ad_checkpoint.saved_residuals(loss, method.split_params(params)[0])
    sizes[remat] = sum(np.prod(aval.shape) * aval.dtype.itemsize for aval, _ in residuals)
  assert sizes[True] < sizes[False]
