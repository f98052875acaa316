"""Metrics against confusion matrices whose figures are worked out by hand."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax import metrics

# Rows = ground truth (A, B, BACK), columns = prediction.
# Row sums 6, 5, 6; column sums 4, 5, 8; total 17; trace 12.
CONFUSION_3 = np.array([[3, 1, 2],
                        [0, 4, 1],
                        [1, 0, 5]])

# BCSS-like (TUM, STR, LYM, NEC, BACK). Row sums 16, 12, 8, 7, 7; column sums 14, 13, 7, 5, 11;
# total 50; trace 33.
CONFUSION_5 = np.array([[10, 2, 0, 1, 3],
                        [1, 8, 1, 0, 2],
                        [0, 2, 6, 0, 0],
                        [2, 0, 0, 4, 1],
                        [1, 1, 0, 0, 5]])
TISSUE_NAMES = ['TUM', 'STR', 'LYM', 'NEC']


def test_3x3_matches_hand_computation():
  m = metrics.segmentation_metrics(CONFUSION_3, ['A', 'B', 'BACK'], num_tissue_classes=2)
  assert m['IoU/A'] == pytest.approx(3 / (3 + 1 + 3))        # TP / (TP + FP + FN): FP = 1, FN = 3
  assert m['IoU/B'] == pytest.approx(4 / (4 + 1 + 1))
  assert m['IoU/BACK'] == pytest.approx(5 / (5 + 3 + 1))
  assert m['Dice/A'] == pytest.approx(6 / 10)
  assert m['Dice/B'] == pytest.approx(8 / 10)
  assert m['Dice/BACK'] == pytest.approx(10 / 14)
  assert m['mIoU'] == pytest.approx((3 / 7 + 4 / 6) / 2)     # background excluded from the mean
  assert m['mDice'] == pytest.approx((6 / 10 + 8 / 10) / 2)
  assert m['FwIoU'] == pytest.approx((6 * 3 / 7 + 5 * 4 / 6 + 6 * 5 / 9) / 17)
  assert m['pixel_accuracy'] == pytest.approx(12 / 17)
  # Binary tissue vs background: tissue->tissue 8, tissue->BACK 3, BACK->tissue 1, BACK->BACK 5.
  assert m['tissue_Dice'] == pytest.approx(16 / (16 + 3 + 1))
  assert m['back_Dice'] == pytest.approx(10 / (10 + 3 + 1))
  assert m['tissue_back_Dice'] == pytest.approx((16 / 20 + 10 / 14) / 2)
  # The reference's fg/bg: value 0 (A) vs the rest: A->A 3, A->rest 3, rest->A 1, rest->rest 10.
  assert m['fg_Dice'] == pytest.approx(6 / (6 + 3 + 1))
  assert m['bg_Dice'] == pytest.approx(20 / (20 + 3 + 1))
  assert m['fg_bg_Dice'] == pytest.approx((6 / 10 + 20 / 24) / 2)
  assert m['mean_mode'] == 'nanmean'
  json.dumps(m)  # plain Python floats, and the mode string
  assert all(type(value) is float for key, value in m.items() if key != 'mean_mode')


def test_3x3_ignore_background_drops_background_ground_truth_pixels():
  # Matrix becomes [[3, 1, 2], [0, 4, 1], [0, 0, 0]]: total 11, trace 7.
  m = metrics.segmentation_metrics(CONFUSION_3, ['A', 'B', 'BACK'], 2, ignore_background=True)
  assert m['IoU/A'] == pytest.approx(3 / 6)
  assert m['IoU/B'] == pytest.approx(4 / 6)
  assert m['IoU/BACK'] == pytest.approx(0.0)                 # 0 / (0 + 3 + 0): only false positives left
  assert m['mIoU'] == pytest.approx((3 / 6 + 4 / 6) / 2)
  assert m['pixel_accuracy'] == pytest.approx(7 / 11)
  assert m['FwIoU'] == pytest.approx((6 * 3 / 6 + 5 * 4 / 6) / 11)
  assert m['tissue_Dice'] == pytest.approx(16 / (16 + 3))


def test_5x5_matches_hand_computation_and_names_background():
  m = metrics.segmentation_metrics(CONFUSION_5, TISSUE_NAMES, num_tissue_classes=4)  # K-1 names
  iou = {'TUM': 10 / 20, 'STR': 8 / 17, 'LYM': 6 / 9, 'NEC': 4 / 8, 'BACK': 5 / 13}
  dice = {'TUM': 20 / 30, 'STR': 16 / 25, 'LYM': 12 / 15, 'NEC': 8 / 12, 'BACK': 10 / 18}
  for name in iou:
    assert m[f'IoU/{name}'] == pytest.approx(iou[name]), name
    assert m[f'Dice/{name}'] == pytest.approx(dice[name]), name
  assert m['mIoU'] == pytest.approx((10 / 20 + 8 / 17 + 6 / 9 + 4 / 8) / 4)
  assert m['mDice'] == pytest.approx((20 / 30 + 16 / 25 + 12 / 15 + 8 / 12) / 4)
  assert m['FwIoU'] == pytest.approx((16 * 10 / 20 + 12 * 8 / 17 + 8 * 6 / 9 + 7 * 4 / 8 + 7 * 5 / 13) / 50)
  assert m['pixel_accuracy'] == pytest.approx(33 / 50)
  # tissue->BACK 3+2+0+1 = 6, BACK->tissue 1+1 = 2, BACK->BACK 5, tissue->tissue 50-6-2-5 = 37.
  assert m['tissue_Dice'] == pytest.approx(74 / (74 + 6 + 2))
  assert m['back_Dice'] == pytest.approx(10 / (10 + 6 + 2))
  # TUM vs rest (the reference's fg/bg): TUM->TUM 10, TUM->rest 6, rest->TUM 1+0+2+1 = 4, rest->rest 30.
  assert m['fg_Dice'] == pytest.approx(20 / (20 + 6 + 4))
  assert m['bg_Dice'] == pytest.approx(60 / (60 + 6 + 4))
  assert m['fg_bg_Dice'] == pytest.approx((20 / 30 + 60 / 70) / 2)
  # Without absent classes both mean modes agree.
  reference = metrics.segmentation_metrics(CONFUSION_5, TISSUE_NAMES, 4, mean_mode='reference')
  assert reference['mean_mode'] == 'reference'
  for key in ('mIoU', 'mDice', 'FwIoU', 'pixel_accuracy', 'fg_Dice', 'bg_Dice', 'fg_bg_Dice'):
    assert reference[key] == pytest.approx(m[key]), key


def test_5x5_ignore_background():
  # BACK row dropped: total 43, trace 28; column sums become 13, 12, 7, 5, 6.
  m = metrics.segmentation_metrics(CONFUSION_5, TISSUE_NAMES, 4, ignore_background=True)
  assert m['IoU/TUM'] == pytest.approx(10 / (16 + 13 - 10))
  assert m['IoU/STR'] == pytest.approx(8 / (12 + 12 - 8))
  assert m['IoU/LYM'] == pytest.approx(6 / 9)
  assert m['IoU/NEC'] == pytest.approx(4 / 8)
  assert m['mIoU'] == pytest.approx((10 / 19 + 8 / 16 + 6 / 9 + 4 / 8) / 4)
  assert m['pixel_accuracy'] == pytest.approx(28 / 43)


def test_absent_class_is_nan_and_skipped_by_the_means():
  confusion = np.array([[2, 0, 0], [0, 0, 0], [0, 0, 1]])
  m = metrics.segmentation_metrics(confusion, ['A', 'B'], 2)
  assert np.isnan(m['IoU/B']) and np.isnan(m['Dice/B'])
  assert m['mIoU'] == pytest.approx(1.0) and m['mDice'] == pytest.approx(1.0)
  assert m['FwIoU'] == pytest.approx(1.0)
  table = metrics.format_metrics_table(m)
  assert 'n/a' in table
  # The reference's plain means: one absent class makes mIoU, mDice and FwIoU NaN.
  reference = metrics.segmentation_metrics(confusion, ['A', 'B'], 2, mean_mode='reference')
  assert np.isnan(reference['mIoU']) and np.isnan(reference['mDice']) and np.isnan(reference['FwIoU'])
  assert reference['pixel_accuracy'] == pytest.approx(1.0) and reference['fg_bg_Dice'] == pytest.approx(1.0)
  table = metrics.format_metrics_table(reference)
  assert 'means: reference' in table and table.splitlines()[-1].startswith('means: reference')
  assert 'means: nanmean' in metrics.format_metrics_table(m)


def test_absent_first_class_differs_between_mean_modes():
  # A absent; rows B: [0, 3, 1], BACK: [0, 1, 2]. IoU/B = 3/5, IoU/BACK = 2/4; freq B 4/7, BACK 3/7.
  confusion = np.array([[0, 0, 0], [0, 3, 1], [0, 1, 2]])
  nanmean = metrics.segmentation_metrics(confusion, ['A', 'B'], 2)
  reference = metrics.segmentation_metrics(confusion, ['A', 'B'], 2, mean_mode='reference')
  assert nanmean['mIoU'] == pytest.approx(3 / 5) and nanmean['mDice'] == pytest.approx(6 / 8)
  assert nanmean['FwIoU'] == pytest.approx(4 / 7 * 3 / 5 + 3 / 7 * 2 / 4)
  assert np.isnan(nanmean['fg_Dice']) and nanmean['bg_Dice'] == pytest.approx(1.0)  # A vs rest: 0/0, 14/14
  assert nanmean['fg_bg_Dice'] == pytest.approx(1.0)
  for key in ('mIoU', 'mDice', 'FwIoU', 'fg_Dice', 'fg_bg_Dice'):
    assert np.isnan(reference[key]), key
  assert reference['pixel_accuracy'] == nanmean['pixel_accuracy'] == pytest.approx(5 / 7)
  # tissue (A, B) vs BACK: tissue->tissue 3, tissue->BACK 1, BACK->tissue 1, BACK->BACK 2.
  assert reference['tissue_Dice'] == pytest.approx(6 / 8) and reference['back_Dice'] == pytest.approx(4 / 6)
  with pytest.raises(ValueError, match='mean_mode'):
    metrics.segmentation_metrics(confusion, ['A', 'B'], 2, mean_mode='mean')


def test_reference_formulas_on_random_labels():
  """A torch transcription of the reference's `ConfusionMatrixAllClass` on random label maps."""
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(3)
  truth = rng.integers(0, 5, (4, 16, 16))
  pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 5, truth.shape))
  a, b = torch.from_numpy(truth), torch.from_numpy(pred)
  h = torch.bincount(5 * a.reshape(-1) + b.reshape(-1), minlength=25).reshape(5, 5).double()
  iu = torch.diag(h) / (h.sum(1) + h.sum(0) - torch.diag(h))
  dice = 2 * torch.diag(h) / (h.sum(1) + h.sum(0))
  fw_iu = ((h.sum(1) / h.sum()) * iu).sum()
  binary_a, binary_b = (a != 0).long(), (b != 0).long()
  h2 = torch.bincount(2 * binary_a.reshape(-1) + binary_b.reshape(-1), minlength=4).reshape(2, 2).double()
  dice_bg_fg = 2 * torch.diag(h2) / (h2.sum(1) + h2.sum(0))
  confusion = np.zeros((5, 5), np.int64)
  np.add.at(confusion, (truth.ravel(), pred.ravel()), 1)
  m = metrics.segmentation_metrics(confusion, TISSUE_NAMES, 4, mean_mode='reference')
  assert m['mIoU'] == pytest.approx(iu[:-1].mean().item(), abs=1e-12)
  assert m['mDice'] == pytest.approx(dice[:-1].mean().item(), abs=1e-12)
  assert m['FwIoU'] == pytest.approx(fw_iu.item(), abs=1e-12)
  assert m['pixel_accuracy'] == pytest.approx((torch.diag(h).sum() / h.sum()).item(), abs=1e-12)
  assert [m['fg_Dice'], m['bg_Dice']] == pytest.approx(dice_bg_fg.tolist(), abs=1e-12)
  assert m['fg_bg_Dice'] == pytest.approx(dice_bg_fg.mean().item(), abs=1e-12)


def test_bad_arguments_raise():
  with pytest.raises(ValueError):
    metrics.segmentation_metrics(CONFUSION_3, ['A'], 2)
  with pytest.raises(ValueError):
    metrics.segmentation_metrics(CONFUSION_3, ['A', 'B', 'C'], 3)


def test_confusion_matrix_counts_valid_mask_and_out_of_range():
  target = jnp.array([[0, 0, 1], [2, 2, 2]])
  pred = jnp.array([[0, 1, 1], [2, 0, 2]])
  np.testing.assert_array_equal(metrics.confusion_matrix(target, pred, 3),
                                [[1, 1, 0],
                                 [0, 1, 0],
                                 [1, 0, 2]])
  # Second sample is padding: excluded via a per-sample mask broadcast to pixels.
  valid = jnp.array([[True, True, True], [False, False, False]])
  np.testing.assert_array_equal(metrics.confusion_matrix(target, pred, 3, valid),
                                [[1, 1, 0],
                                 [0, 1, 0],
                                 [0, 0, 0]])
  np.testing.assert_array_equal(metrics.confusion_matrix(target, pred, 3, jnp.array([True, False])[:, None]),
                                metrics.confusion_matrix(target, pred, 3, valid))
  # An ignore label (255) in the ground truth never lands in the matrix.
  ignored = target.at[0, 0].set(255)
  np.testing.assert_array_equal(metrics.confusion_matrix(ignored, pred, 3),
                                [[0, 1, 0],
                                 [0, 1, 0],
                                 [1, 0, 2]])


def test_confusion_matrix_jits_and_matches_numpy():
  rng = np.random.default_rng(0)
  target = rng.integers(0, 5, size=(3, 7, 9))
  pred = rng.integers(0, 5, size=(3, 7, 9))
  valid = np.broadcast_to(np.array([True, True, False])[:, None, None], target.shape)
  out = jax.jit(metrics.confusion_matrix, static_argnums=2)(jnp.asarray(target), jnp.asarray(pred), 5,
                                                            jnp.asarray(valid))
  expected = np.zeros((5, 5), np.int64)
  np.add.at(expected, (target[valid], pred[valid]), 1)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, expected)


def test_table_lists_every_class_and_summary():
  table = metrics.format_metrics_table(metrics.segmentation_metrics(CONFUSION_3, ['A', 'B', 'BACK'], 2))
  lines = table.splitlines()
  assert any(line.startswith('A ') and '42.86' in line and '60.00' in line for line in lines)
  for label in ('BACK', 'mIoU', 'mDice', 'FwIoU', 'pixel acc', 'fg/bg Dice (A vs rest, reference)',
                'tissue/BACK Dice', 'means: nanmean'):
    assert label in table
  assert any(line.startswith('fg/bg Dice (A vs rest, reference)') and line.endswith('71.67')
             for line in lines)  # (60 + 83.33) / 2
  assert [line.split()[0] for line in lines[2:5]] == ['A', 'B', 'BACK']
  assert len({len(line) for line in lines[2:5]}) == 1  # fixed width
