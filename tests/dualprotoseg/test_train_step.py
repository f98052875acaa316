"""The jitted train step: learning, frozen towers, no retracing, loss and optimizer details."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from protoseg_jax import train_state
from protoseg_jax.method import TrainState
from protoseg_jax.methods.dualprotoseg import train
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod


def build(config, total_steps):
  """-> (method, initial state, the jitted step (state donated), schedule) through the method's API."""
  method = DualProtoSegMethod(config)
  params, extra = method.init_variables(jax.random.key(0))
  optimizer, schedules = method.optimizer(method.split_params(params)[0], total_steps)
  state = train_state.create_train_state(params, extra, optimizer, method)
  step = jax.jit(method.train_step_fn(optimizer, schedules), donate_argnums=(0,))
  return method, state, step, schedules['learning_rate']


@pytest.fixture(scope='module')
def trained():
  config = tiny_config()
  _, state, step, schedule = build(config, total_steps=100)
  assert isinstance(state, TrainState) and state.extra == {}
  assert set(state.frozen) == {'trunk', 'text_encoder'}
  rng = np.random.default_rng(0)
  batch = {'images': jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3), np.uint8)),
           'labels': jnp.asarray([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1]], jnp.int32)}
  initial = jax.tree.map(np.asarray, state)  # host copy: the step donates its input buffers
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
  return dict(config=config, initial=initial, state=state, losses=losses, step=step, schedule=schedule)


def test_loss_decreases_on_a_fixed_batch(trained):
  losses = trained['losses']
  assert losses[-1] < 0.8 * losses[0], losses


def test_frozen_towers_unchanged_and_heads_updated(trained):
  initial, state = trained['initial'], trained['state']
  for before, after in zip(jax.tree.leaves(initial.frozen), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(before, np.asarray(after))
  changed = [not np.array_equal(b, np.asarray(a))
             for b, a in zip(jax.tree.leaves(initial.trainable), jax.tree.leaves(state.trainable))]
  assert all(changed), 'every trainable leaf (incl. prompt context and logit scales) must move'
  assert int(state.step) == 12


def test_train_step_compiles_once(trained):
  assert trained['step']._cache_size() == 1


def test_optimizer_state_covers_trainable_only(trained):
  state = trained['state']
  count = lambda tree: sum(np.size(leaf) for leaf in jax.tree.leaves(tree))
  # AdamW keeps two moments per trainable value (+ scalar counts); nothing for the frozen towers.
  assert count(state.opt_state) < 2 * count(state.trainable) + 16


def test_poly_schedule():
  config = tiny_config()
  _, schedule = train.make_optimizer(config.train, {}, total_steps=10)
  lr = config.train.learning_rate
  np.testing.assert_allclose([float(schedule(t)) for t in (0, 5, 10)], [lr, lr * 0.5, 0.0], rtol=1e-6)


def test_weight_decay_masks():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 2)), 'bias': jnp.ones((2,))},
            'norm': {'scale': jnp.ones((2,))}, 'logit_scale1': jnp.ones(()), 'ctx': jnp.ones((2, 3, 4))}
  # 'matrices' exempts biases, norms and 0-D/1-D parameters; 'all' (the reference) decays everything.
  assert train_state.decay_mask(params, 'matrices') == {'conv': {'kernel': True, 'bias': False},
                                                        'norm': {'scale': False}, 'logit_scale1': False,
                                                        'ctx': True}
  assert all(jax.tree.leaves(train_state.decay_mask(params, 'all')))
  with pytest.raises(ValueError, match='config.train.weight_decay_on'):
    train_state.decay_mask(params, 'biases')


def test_multiscale_bce_matches_numpy():
  rng = np.random.default_rng(5)
  scores = rng.normal(size=(4, 3, 2 * 4 * 2))  # [L, B, P] with C=4 classes x 4 prototypes
  labels = rng.integers(0, 2, (3, 4))
  weights = np.array([1.0, 0.5, 2.0, 1.0])
  loss, per_level = train.multiscale_bce(jnp.asarray(scores, jnp.float32), jnp.asarray(labels), 4, 'mean',
                                         jnp.asarray(weights, jnp.float32))
  x = scores.reshape(4, 3, 4, 4).mean(-1)
  bce = np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))  # BCEWithLogits, stable form
  np.testing.assert_allclose(np.asarray(per_level), bce.mean(axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(float(loss), (weights * bce.mean(axis=(1, 2))).sum(), rtol=1e-5)


def test_prototype_diversity_matches_numpy():
  rng = np.random.default_rng(6)
  cam = rng.normal(size=(2, 3, 3, 2 * 3))  # B=2, 3x3 pixels, C=2 classes x 3 prototypes
  labels = np.array([[1, 0], [1, 1]])
  value = float(train.prototype_diversity(jnp.asarray(cam, jnp.float32), jnp.asarray(labels), 2))
  total, count = 0.0, 0
  for b in range(2):
    for c in range(2):
      if not labels[b, c]:
        continue
      maps = cam[b].reshape(9, 2, 3)[:, c]
      p = np.exp(maps) / np.exp(maps).sum(0)
      pairs = [np.exp(-np.sum((p[:, k] - p[:, l]) * (np.log(p[:, k]) - np.log(p[:, l]))))
               for k in range(3) for l in range(3) if k != l]
      total += np.mean(pairs)
      count += 1
  assert value == pytest.approx(total / count, rel=1e-5)
  identical = np.repeat(cam[..., :1], 6, axis=-1)  # all prototypes fire alike: J = 0, term = 1
  assert float(train.prototype_diversity(jnp.asarray(identical, jnp.float32), jnp.asarray(labels), 2)) == \
      pytest.approx(1.0, rel=1e-5)


def test_train_step_with_diversity_term_runs_and_reports_it():
  config = tiny_config()
  config.train.diversity_weight = 0.1
  _, state, step, _ = build(config, total_steps=10)
  batch = {'images': jnp.zeros((4, 32, 32, 3), jnp.uint8), 'labels': jnp.ones((4, 4), jnp.int32)}
  _, metrics = step(state, batch, jax.random.key(0))
  levels = sum(float(metrics[f'loss_level{i}']) for i in range(1, 5))
  assert 0 < float(metrics['diversity']) <= 1
  assert float(metrics['loss']) == pytest.approx(levels + 0.1 * float(metrics['diversity']), rel=1e-5)
