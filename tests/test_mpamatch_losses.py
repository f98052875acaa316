"""MPAMatch losses against float64 NumPy, confidence masking, and the EMA image-prototype bank."""

import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax.mpamatch import losses, prototypes


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_confidence_mask_thresholds_the_max_probability():
  probs = jnp.asarray([[0.96, 0.04], [0.94, 0.06], [0.02, 0.98], [0.5, 0.5]], jnp.float32)
  labels, confidence, mask = losses.confidence_mask(probs, 0.95)
  np.testing.assert_array_equal(labels, [0, 0, 1, 0])
  np.testing.assert_allclose(confidence, [0.96, 0.94, 0.98, 0.5], rtol=1e-6)
  np.testing.assert_array_equal(mask, [True, False, True, False])


def test_masked_cross_entropy_uses_unimatch_normaliser():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 3)) * 3
  pseudo = rng.integers(0, 3, (2, 5, 6))
  confidence = rng.uniform(0.8, 1.0, (2, 5, 6))
  ignore = np.where(rng.uniform(size=(2, 5, 6)) < 0.2, 255, 0)
  ours = losses.masked_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(pseudo),
                                     jnp.asarray(confidence, jnp.float32), jnp.asarray(ignore), 0.95)
  nll = -np.take_along_axis(_log_softmax64(logits), pseudo[..., None], axis=-1)[..., 0]
  keep = (confidence >= 0.95) & (ignore != 255)
  expected = (nll * keep).sum() / (ignore != 255).sum()   # all non-padded pixels, confident or not
  assert float(ours) == pytest.approx(expected, rel=1e-5)
  assert keep.sum() < (ignore != 255).sum()  # the normaliser really differs from the kept count here


def test_cross_entropy_and_dice_ignore_255():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 4, 3))
  labels = rng.integers(0, 3, (2, 4, 4))
  labels[0, 0, :] = 255
  valid = labels != 255
  nll = -np.take_along_axis(_log_softmax64(logits), np.clip(labels, 0, 2)[..., None], axis=-1)[..., 0]
  ce = losses.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(labels))
  assert float(ce) == pytest.approx(nll[valid].mean(), rel=1e-5)

  probs = np.exp(_log_softmax64(logits))[valid]
  target = np.eye(3)[labels[valid]]
  per_class = 1 - (2 * (probs * target).sum(0) + 1e-5) / ((probs ** 2).sum(0) + (target ** 2).sum(0) + 1e-5)
  dice = losses.dice_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 1e-5)
  assert float(dice) == pytest.approx(per_class.mean(), rel=1e-5)


def test_prototype_infonce_matches_float64_numpy():
  rng = np.random.default_rng(2)
  embeddings = _unit(rng.normal(size=(3, 4, 4, 8)))
  protos = _unit(rng.normal(size=(3, 8)))
  labels = rng.integers(0, 3, (3, 4, 4))
  weights = (rng.uniform(size=(3, 4, 4)) < 0.7).astype(np.float64)
  normaliser = 40.0
  ours = losses.prototype_infonce(jnp.asarray(embeddings, jnp.float32), jnp.asarray(protos, jnp.float32),
                                  jnp.asarray(labels), jnp.asarray(weights, jnp.float32), jnp.asarray(normaliser),
                                  temperature=0.1)
  logits = embeddings @ protos.T / 0.1
  nll = -np.take_along_axis(_log_softmax64(logits), labels[..., None], axis=-1)[..., 0]
  assert float(ours) == pytest.approx((nll * weights).sum() / normaliser, rel=1e-5)


def test_class_sums_and_counts():
  embeddings = np.arange(12, dtype=np.float32).reshape(1, 2, 3, 2)
  labels = np.asarray([[[0, 1, 1], [2, 0, 255]]])
  weights = np.asarray([[[1, 1, 0], [1, 1, 1]]], np.float32)
  sums, counts = prototypes.class_sums(jnp.asarray(embeddings), jnp.asarray(labels), jnp.asarray(weights), 3)
  flat, lab, w = embeddings.reshape(-1, 2), labels.reshape(-1), weights.reshape(-1)
  for c in range(3):
    keep = (lab == c) & (w > 0)
    np.testing.assert_allclose(sums[c], flat[keep].sum(0))
    assert float(counts[c]) == keep.sum()


def test_ema_update_first_sight_momentum_and_absent_classes():
  bank = prototypes.PrototypeBank.empty(3, 2)
  sums = jnp.asarray([[2.0, 0.0], [0.0, 0.0], [0.0, 5.0]])
  counts = jnp.asarray([2.0, 0.0, 1.0])
  bank = prototypes.ema_update(bank, sums, counts, 0.9)
  # First sight: the batch prototype as is; class 1 absent -> still zero and unseen.
  np.testing.assert_allclose(bank.prototypes, [[1, 0], [0, 0], [0, 1]], atol=1e-7)
  np.testing.assert_array_equal(bank.seen, [True, False, True])

  sums = jnp.asarray([[0.0, 3.0], [4.0, 3.0], [0.0, 0.0]])
  counts = jnp.asarray([3.0, 1.0, 0.0])
  bank = prototypes.ema_update(bank, sums, counts, 0.9)
  expected0 = _unit(0.9 * np.asarray([1.0, 0.0]) + 0.1 * np.asarray([0.0, 1.0]))
  np.testing.assert_allclose(bank.prototypes[0], expected0, atol=1e-6)
  np.testing.assert_allclose(bank.prototypes[1], [0.8, 0.6], atol=1e-6)   # first sight of class 1
  np.testing.assert_allclose(bank.prototypes[2], [0.0, 1.0], atol=1e-7)   # absent: unchanged
  np.testing.assert_array_equal(bank.seen, [True, True, True])
