"""RandomRotate90 as albumentations draws it: fires with probability p, then k ~ U{0..3}.

With the reference's p = 0.5: P(k=0) = 0.625, P(k=1) = P(k=2) = P(k=3) = 0.125; p = 1.0 is k uniform.
Checked on the device (`augment.flip_rotate`) and host (`grain_pipeline.host_flip_rotate`) twins, and that
DualProtoSeg's train step hands `config.data.augment.rot90_prob` to the device one.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from protoseg_jax import augment
from protoseg_jax.data import grain_pipeline

DRAWS = 200_000
BASE = np.arange(4, dtype=np.uint8).reshape(2, 2, 1)  # its four quarter turns are all different


def expected_frequencies(rot90_prob):
  return np.array([1 - rot90_prob + rot90_prob / 4] + [rot90_prob / 4] * 3)


def assert_frequencies(counts, probabilities):
  """Each frequency within 4 standard errors of its probability."""
  total = counts.sum()
  standard_error = np.sqrt(probabilities * (1 - probabilities) / total)
  frequencies = counts / total
  assert np.all(np.abs(frequencies - probabilities) <= 4 * standard_error + 1e-12), (frequencies,
                                                                                   probabilities)


def quarter_turns(images, rotate):
  """k of each `[..., 2, 2, 1]` output, by matching against `rotate(BASE, k)` for k = 0..3."""
  turns = np.full(images.shape[0], -1)
  for k in range(4):
    turns[np.all(images == np.asarray(rotate(BASE, k)), axis=(1, 2, 3))] = k
  assert np.all(turns >= 0)
  return turns


def device_turns(rot90_prob, seed=0, draws=DRAWS):
  """`rot90_prob=None`: the function's default."""
  kwargs = {} if rot90_prob is None else {'rot90_prob': rot90_prob}
  images = jnp.broadcast_to(jnp.asarray(BASE), (draws, 2, 2, 1))
  rotate = jax.jit(lambda key, x: augment.flip_rotate(key, x, hflip=False, vflip=False, **kwargs))
  out = rotate(jax.random.key(seed), images)
  return quarter_turns(np.asarray(out), lambda image, k: np.rot90(image, k, axes=(0, 1)))


def host_turns(rot90_prob, seed=0, draws=DRAWS):
  """`rot90_prob=None`: the function's default."""
  rng = np.random.default_rng(seed)
  kwargs = {} if rot90_prob is None else {'rot90_prob': rot90_prob}
  out = np.stack([grain_pipeline.host_flip_rotate(BASE, rng, hflip=False, vflip=False, **kwargs)
                  for _ in range(draws)])
  return quarter_turns(out, lambda image, k: np.rot90(image, k, axes=(0, 1)))


@pytest.mark.parametrize('turns_fn', [device_turns, host_turns], ids=['device', 'host'])
def test_default_is_albumentations_p_half(turns_fn):
  counts = np.bincount(turns_fn(None), minlength=4)   # default argument: rot90_prob=0.5
  assert_frequencies(counts, np.array([0.625, 0.125, 0.125, 0.125]))
  # Not uniform: P(k=0) = 0.25 would be ~ 650 standard errors away.
  assert counts[0] / DRAWS > 0.6


@pytest.mark.parametrize('turns_fn', [device_turns, host_turns], ids=['device', 'host'])
def test_probability_one_is_the_old_uniform_draw(turns_fn):
  counts = np.bincount(turns_fn(1.0, draws=50_000), minlength=4)
  assert_frequencies(counts, expected_frequencies(1.0))
  counts = np.bincount(turns_fn(0.2, seed=1, draws=50_000), minlength=4)
  assert_frequencies(counts, expected_frequencies(0.2))


def test_probability_one_keeps_the_old_random_streams():
  # Host: the pre-change code drew exactly one `integers(0, 4)` per sample for the rotation.
  rng, old = np.random.default_rng(7), np.random.default_rng(7)
  for _ in range(50):
    image = grain_pipeline.host_flip_rotate(BASE, rng, rot90_prob=1.0)
    expected = BASE[:, ::-1] if old.random() < 0.5 else BASE
    expected = expected[::-1] if old.random() < 0.5 else expected
    np.testing.assert_array_equal(image, np.rot90(expected, int(old.integers(0, 4)), axes=(0, 1)))
  # Device: k is still `randint(third split key, 0, 4)`.
  key = jax.random.key(3)
  images = jnp.broadcast_to(jnp.asarray(BASE), (64, 2, 2, 1))
  out = augment.flip_rotate(key, images, hflip=False, vflip=False, rot90_prob=1.0)
  old_k = np.asarray(jax.random.randint(jax.random.split(key, 3)[2], (64,), 0, 4))
  np.testing.assert_array_equal(quarter_turns(np.asarray(out), lambda image, k: np.rot90(image, k)), old_k)


def test_bad_probability_names_the_key():
  with pytest.raises(ValueError, match=r'config.data.augment.rot90_prob is 1.5'):
    augment.flip_rotate(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), rot90_prob=1.5)
  with pytest.raises(ValueError, match=r'config.data.augment.rot90_prob is -0.1'):
    grain_pipeline.host_flip_rotate(BASE, np.random.default_rng(0), rot90_prob=-0.1)


def test_host_augment_reads_the_config_key():
  data = ml_collections.ConfigDict({'augment': {'hflip': True, 'vflip': True, 'rot90': True},
                                    'mean': (0.5, 0.5, 0.5), 'std': (0.2, 0.2, 0.2)})
  assert grain_pipeline.HostAugment.from_config(data).rot90_prob == 0.5   # absent key: the reference's
  data.augment.rot90_prob = 1.0
  assert grain_pipeline.HostAugment.from_config(data).rot90_prob == 1.0


def test_albumentations_referee():
  """albumentations' own `RandomRotate90(p=0.5)` gives the same distribution (test-only dependency)."""
  albumentations = pytest.importorskip('albumentations')
  draws = 40_000
  try:
    transform = albumentations.Compose([albumentations.RandomRotate90(p=0.5)], seed=11)
  except TypeError:  # albumentations < 1.4.14 has no Compose seed: it uses the `random` module
    import random
    random.seed(11)
    transform = albumentations.Compose([albumentations.RandomRotate90(p=0.5)])
  image = np.ascontiguousarray(np.broadcast_to(BASE, (2, 2, 3)))
  out = np.stack([transform(image=image)['image'][..., :1] for _ in range(draws)])
  theirs = np.bincount(quarter_turns(out, lambda base, k: np.rot90(base, k, axes=(0, 1))), minlength=4)
  assert_frequencies(theirs, np.array([0.625, 0.125, 0.125, 0.125]))
  ours = np.bincount(host_turns(None, seed=5, draws=draws), minlength=4)
  # Two-sample check: our frequencies and albumentations' agree within 4 combined standard errors.
  p_theirs, p_ours = theirs / draws, ours / draws
  combined = np.sqrt(p_theirs * (1 - p_theirs) / draws + p_ours * (1 - p_ours) / draws)
  assert np.all(np.abs(p_theirs - p_ours) <= 4 * combined), (p_theirs, p_ours)


@pytest.mark.parametrize('rot90_prob', [None, 1.0])
def test_train_step_passes_the_config_probability(monkeypatch, rot90_prob):
  """The step's augmentation gets `config.data.augment.rot90_prob` (traced only, nothing compiled)."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from protoseg_jax import train_state  # pylint: disable=g-import-not-at-top
  from protoseg_jax.methods.dualprotoseg import method as method_lib  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  if rot90_prob is not None:
    config.data.augment.rot90_prob = rot90_prob
  seen, original = [], augment.flip_rotate

  def recording(*args, **kwargs):
    seen.append(kwargs)
    return original(*args, **kwargs)

  monkeypatch.setattr(augment, 'flip_rotate', recording)
  method = method_lib.DualProtoSegMethod(config)
  optimizer, schedules = method.optimizer(method.split_params(jax.eval_shape(
      method.random_variables, jax.random.key(0))[0])[0], total_steps=10)
  state = train_state.abstract_train_state(method, optimizer)
  batch = {'images': jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.uint8),
           'labels': jax.ShapeDtypeStruct((4, 4), jnp.int32)}
  jax.eval_shape(method.train_step_fn(optimizer, schedules), state, batch, jax.random.key(0))
  assert [kwargs.get('rot90_prob') for kwargs in seen] == [0.5 if rot90_prob is None else rot90_prob]
  if rot90_prob is None:  # the default config's draw: P(k=0) = 0.625
    counts = np.bincount(device_turns(seen[0]['rot90_prob'], draws=50_000), minlength=4)
    assert_frequencies(counts, np.array([0.625, 0.125, 0.125, 0.125]))
