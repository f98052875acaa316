"""`config.train.weight_decay_on`: the method's AdamW against `torch.optim.AdamW` on the same tensors.

The reference (`train.py`) hands `PolyWarmupAdamW` (a `torch.optim.AdamW`) one flat list of every trainable
tensor, so biases, GroupNorm affines and the 0-D logit scales are decayed ('all', the default); 'matrices'
is the usual exemption of ndim < 2 tensors (torch: a second parameter group with weight_decay 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

from configs import bcss  # noqa: E402  (tests/tiny_config.py puts the repository root on sys.path)
from conftest import tiny_config  # noqa: E402
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod  # noqa: E402

# Names and ranks as the trainable heads have them: conv kernels, a conv bias, GroupNorm affines, a dense
# layer, the image prototypes, a 0-D logit scale and the 3-D prompt context.
SHAPES = {'shared_decoder': {'block0_conv1': {'kernel': (3, 3, 4, 4)},
                             'block0_skip': {'kernel': (1, 1, 4, 4), 'bias': (4,)},
                             'block0_norm1': {'scale': (4,), 'bias': (4,)}},
          'text_proj': {'kernel': (6, 5), 'bias': (5,)}, 'learnable_image_prototypes': (4, 5),
          'logit_scale1': (), 'prompt_learner': {'ctx': (2, 3, 6)}}


def hand_set(seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda shape: np.asarray(scale * rng.normal(size=shape), np.float32), SHAPES,
                      is_leaf=lambda node: isinstance(node, tuple))


def torch_adamw_step(params, grads, train_config, decay_on):
  """One `torch.optim.AdamW` step: one group ('all'), or ndim >= 2 / ndim < 2 with weight_decay 0."""
  leaves, treedef = jax.tree.flatten(params)
  tensors = [torch.nn.Parameter(torch.from_numpy(leaf.copy())) for leaf in leaves]
  for tensor, grad in zip(tensors, jax.tree.leaves(grads)):
    tensor.grad = torch.from_numpy(grad.copy())
  if decay_on == 'all':
    groups = [{'params': tensors}]
  else:
    groups = [{'params': [t for t in tensors if t.ndim >= 2]},
              {'params': [t for t in tensors if t.ndim < 2], 'weight_decay': 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=train_config.learning_rate, betas=(train_config.adam_b1,
                                train_config.adam_b2), eps=train_config.adam_eps,
                                weight_decay=train_config.weight_decay)
  optimizer.step()
  return jax.tree.unflatten(treedef, [t.detach().numpy() for t in tensors])


def method_step(params, grads, config):
  optimizer, _ = DualProtoSegMethod(config).optimizer(params, total_steps=1000)
  params = jax.tree.map(jnp.asarray, params)
  updates, _ = optimizer.update(jax.tree.map(jnp.asarray, grads), optimizer.init(params), params)
  return jax.tree.map(np.asarray, optax.apply_updates(params, updates))


def test_default_is_the_reference():
  assert bcss.get_config().train.weight_decay_on == 'all'


@pytest.mark.parametrize('decay_on', ['all', 'matrices'])
def test_one_step_matches_torch_adamw(decay_on):
  config = tiny_config()
  config.train.update(weight_decay_on=decay_on, learning_rate=1e-2, weight_decay=0.05)
  params, grads = hand_set(0, 2.0), hand_set(1, 1.0)
  ours = method_step(params, grads, config)
  theirs = torch_adamw_step(params, grads, config.train, decay_on)
  for (path, mine), reference in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_the_switch_decides_the_small_tensors_only():
  config = tiny_config()
  config.train.update(learning_rate=1e-2, weight_decay=0.05)
  params, grads = hand_set(0, 2.0), hand_set(1, 1.0)
  decayed = method_step(params, grads, config)
  config.train.weight_decay_on = 'matrices'
  exempt = method_step(params, grads, config)
  for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(decayed), jax.tree.leaves(exempt),
                             jax.tree.leaves(params)):
    if p.ndim >= 2:
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    else:  # the decoupled decay lr * wd * p, far above the 1e-6 tolerance of the torch comparison
      np.testing.assert_allclose(b - a, 1e-2 * 0.05 * p, rtol=1e-3, atol=1e-7,
                                 err_msg=jax.tree_util.keystr(path))
