"""MPAMatch losses against float64 NumPy, confidence masking, and the EMA image-prototype bank."""

import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax.methods.mpamatch import losses, prototypes


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
                                  jnp.asarray(labels), jnp.asarray(weights, jnp.float32),
                                  jnp.asarray(normaliser), temperature=0.1)
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


# --- the composite objective of the semi-supervised step, against a float64 hand computation ---------------

TAU = 0.75
STRIDE = 2


def _composite_fixture():
  """One labelled and one unlabelled 4 x 4 image, 2 classes, embeddings at stride 2 (2 x 2, E = 2)."""
  pred_x = np.asarray([[[(2.0, -1.0), (0.5, 0.5), (-1.0, 1.5), (0.0, 3.0)],
                        [(1.0, 0.0), (0.2, -0.2), (-2.0, 2.0), (0.3, 0.1)],
                        [(0.0, 0.0), (1.5, -0.5), (0.7, 0.9), (-0.4, 0.6)],
                        [(3.0, 1.0), (-1.0, -1.0), (0.1, 0.8), (2.0, 2.5)]]])
  y = np.asarray([[[0, 0, 1, 1], [0, 255, 1, 0], [255, 0, 1, 1], [0, 0, 255, 1]]])
  pred_fp = pred_x[:, ::-1] * 0.7 + 0.2
  pred_s1 = pred_x[:, :, ::-1] * 1.3 - 0.1
  pred_s2 = -0.8 * pred_x
  y_w = np.asarray([[[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]]])
  conf_w = np.asarray([[[0.90, 0.75, 0.60, 0.99], [0.80, 0.70, 0.95, 0.76], [0.74, 0.85, 0.88, 0.51],
                        [0.97, 0.66, 0.79, 0.92]]])
  ignore = np.asarray([[[0, 0, 0, 255], [0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 255, 255]]])
  # CutMix-mixed targets of the two strong views (as `mixed_targets` would give): own / partner values.
  y1, conf1, ignore1 = y_w.copy(), conf_w.copy(), ignore.copy()
  y1[:, :2, :2], conf1[:, :2, :2], ignore1[:, 0, 0] = 1, 0.99, 255
  y2, conf2, ignore2 = 1 - y_w, conf_w[:, :, ::-1].copy(), ignore[:, :, ::-1].copy()
  unit = lambda *angles: np.stack([np.cos(angles), np.sin(angles)], axis=-1)   # unit vectors, E = 2
  embed = lambda *angles: unit(*angles).reshape(1, 2, 2, 2)
  embed_x, embed_s1 = embed(0.1, 1.2, 2.0, -0.5), embed(0.4, 2.5, -1.0, 1.6)
  embed_s2 = embed(3.0, 0.2, 1.1, -2.2)
  image_prototypes, text_prototypes = unit(0.0, 1.57), unit(0.3, 2.1)   # rows: class 0, class 1
  return dict(pred_x=pred_x, y=y, pred_fp=pred_fp, pred_s1=pred_s1, pred_s2=pred_s2, y_w=y_w, conf_w=conf_w,
              ignore=ignore, strong=((y1, conf1, ignore1), (y2, conf2, ignore2)), embed_x=embed_x,
              embed_s=(embed_s1, embed_s2), prototypes={'img': image_prototypes, 'txt': text_prototypes})


def _loss_config():
  from protoseg_jax.methods.mpamatch.config import get_config

  loss = get_config().loss
  # Distinct weights, so that a swapped or dropped weight changes the value; a smoothing term large enough to
  # be seen at 1e-6.
  loss.update(sup_ce_weight=0.6, sup_dice_weight=0.4, dice_smooth=0.5, weight_x=0.9, weight_fp=0.5,
              weight_s=0.25, lambda_img=0.3, lambda_txt=0.7, temperature=0.5, conf_threshold=TAU)
  return loss


def _hand_composite(d, cfg):
  """Float64 NumPy, from the formulas of `losses.py` and `train.py`'s docstrings."""
  def ce(logits, labels):
    return -np.take_along_axis(_log_softmax64(logits), np.clip(labels, 0, 1)[..., None], axis=-1)[..., 0]

  valid = d['y'] != 255
  probs = np.exp(_log_softmax64(d['pred_x']))[valid]
  target = np.eye(2)[d['y'][valid]]
  dice = np.mean(1 - (2 * (probs * target).sum(0) + cfg.dice_smooth)
                 / ((probs ** 2).sum(0) + (target ** 2).sum(0) + cfg.dice_smooth))
  terms = {'loss_x': cfg.sup_ce_weight * ce(d['pred_x'], d['y'])[valid].mean() + cfg.sup_dice_weight * dice}

  def masked(logits, labels, conf, ign):  # UniMatch: normalised by every non-padded pixel
    return (ce(logits, labels) * ((conf >= TAU) & (ign != 255))).sum() / (ign != 255).sum()

  terms['loss_fp'] = masked(d['pred_fp'], d['y_w'], d['conf_w'], d['ignore'])
  terms['loss_s1'] = masked(d['pred_s1'], *d['strong'][0])
  terms['loss_s2'] = masked(d['pred_s2'], *d['strong'][1])

  def infonce(embed, protos, labels, weights, normaliser):  # cosine of unit vectors / T
    return (ce(embed @ protos.T / cfg.temperature, labels) * weights).sum() / normaliser

  y_e = d['y'][:, ::STRIDE, ::STRIDE]
  for name, bank in d['prototypes'].items():
    terms[f'loss_{name}_lab'] = infonce(d['embed_x'], bank, y_e, y_e != 255, (y_e != 255).sum())
    unl = []
    for embed, (labels, conf, ign) in zip(d['embed_s'], d['strong']):
      labels, conf, kept = (a[:, ::STRIDE, ::STRIDE] for a in (labels, conf, ign != 255))
      unl.append(infonce(embed, bank, labels, (conf >= TAU) & kept, kept.sum()))
    terms[f'loss_{name}_unl'] = np.mean(unl)
  total = ((cfg.weight_x * terms['loss_x'] + cfg.weight_fp * terms['loss_fp']
            + cfg.weight_s * (terms['loss_s1'] + terms['loss_s2'])) / 2
           + cfg.lambda_img * (terms['loss_img_lab'] + terms['loss_img_unl'])
           + cfg.lambda_txt * (terms['loss_txt_lab'] + terms['loss_txt_unl']))
  return terms, total


def test_composite_loss_matches_a_float64_hand_computation():
  """L = (w_x L_x + w_fp L_fp + w_s (L_s1 + L_s2)) / 2 + lambda_img (L_img^lab + L_img^unl)
  + lambda_txt (L_txt^lab + L_txt^unl), composed from the library functions exactly as the step does."""
  from protoseg_jax.methods.mpamatch import train

  d, cfg = _composite_fixture(), _loss_config()
  # The fixture exercises what a wrong implementation would get wrong: ignored labels, padded pixels,
  # unconfident non-padded pixels (UniMatch's normaliser differs from the confident count), a confidence
  # exactly at tau (>=), and labelled embedding pixels whose label is ignored.
  assert (d['y'] == 255).any() and (d['conf_w'] == TAU).any()
  counted = d['ignore'] != 255
  assert ((d['conf_w'] >= TAU) & counted).sum() < counted.sum() < counted.size
  assert (d['y'][:, ::STRIDE, ::STRIDE] == 255).any()
  assert (d['strong'][1][1][:, ::STRIDE, ::STRIDE] == TAU).any()   # ... also in a prototype weight

  j = lambda a: jnp.asarray(a, jnp.float32)
  i = lambda a: jnp.asarray(a, jnp.int32)
  terms = {'loss_x': train.supervised_loss(j(d['pred_x']), i(d['y']), cfg),
           'loss_fp': losses.masked_cross_entropy(j(d['pred_fp']), i(d['y_w']), j(d['conf_w']),
                                                  i(d['ignore']), TAU)}
  strong = tuple((i(labels), j(conf), i(ign)) for labels, conf, ign in d['strong'])
  for name, logits, (labels, conf, ign) in zip(('loss_s1', 'loss_s2'), (d['pred_s1'], d['pred_s2']), strong):
    terms[name] = losses.masked_cross_entropy(j(logits), labels, conf, ign, TAU)
  y_e = i(d['y'])[:, ::STRIDE, ::STRIDE]
  valid_e = (y_e != losses.IGNORE).astype(jnp.float32)
  for name, bank in d['prototypes'].items():
    terms[f'loss_{name}_lab'], terms[f'loss_{name}_unl'] = train.prototype_contrast(
        j(d['embed_x']), tuple(j(e) for e in d['embed_s']), j(bank), y_e, valid_e, strong, STRIDE, cfg)
  total = train.composite_loss(terms, cfg)

  want_terms, want_total = _hand_composite(d, cfg)
  assert set(terms) == set(want_terms)
  for name, want in want_terms.items():
    assert abs(float(terms[name]) - want) <= 1e-6, (name, float(terms[name]), want)
    assert want > 1e-2, name  # every term contributes
  assert abs(float(total) - want_total) <= 1e-6, (float(total), want_total)

  # Without the prototype terms (variant 'unimatch') the objective is the UniMatch part alone.
  unimatch = {key: terms[key] for key in ('loss_x', 'loss_fp', 'loss_s1', 'loss_s2')}
  want_unimatch = (cfg.weight_x * want_terms['loss_x'] + cfg.weight_fp * want_terms['loss_fp']
                   + cfg.weight_s * (want_terms['loss_s1'] + want_terms['loss_s2'])) / 2
  assert abs(float(train.composite_loss(unimatch, cfg)) - want_unimatch) <= 1e-6
