"""Metrics against a confusion matrix computed by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax import metrics

# Rows = ground truth (A, B, BACK), columns = prediction.
CONFUSION = np.array([[3, 1, 2],
                      [0, 4, 1],
                      [1, 0, 5]])


def test_metrics_match_hand_computation():
  m = metrics.segmentation_metrics(CONFUSION, ['A', 'B', 'BACK'], num_tissue_classes=2)
  assert m['IoU/A'] == pytest.approx(3 / 7) and m['IoU/B'] == pytest.approx(4 / 6)
  assert m['IoU/BACK'] == pytest.approx(5 / 9)
  assert m['Dice/A'] == pytest.approx(6 / 10) and m['Dice/B'] == pytest.approx(8 / 10)
  assert m['mIoU'] == pytest.approx((3 / 7 + 4 / 6) / 2)      # background excluded from the mean
  assert m['mDice'] == pytest.approx(0.7)
  assert m['FwIoU'] == pytest.approx((6 * 3 / 7 + 5 * 4 / 6 + 6 * 5 / 9) / 17)
  assert m['pixel_accuracy'] == pytest.approx(12 / 17)
  assert m['fg_bg_Dice'] == pytest.approx(2 * 8 / (2 * 8 + 1 + 3))


def test_ignore_background_drops_background_ground_truth_pixels():
  m = metrics.segmentation_metrics(CONFUSION, ['A', 'B', 'BACK'], 2, ignore_background=True)
  assert m['IoU/A'] == pytest.approx(3 / 6) and m['IoU/B'] == pytest.approx(4 / 6)
  assert m['pixel_accuracy'] == pytest.approx(7 / 11)


def test_absent_class_is_nan_and_skipped():
  confusion = np.array([[2, 0, 0], [0, 0, 0], [0, 0, 1]])
  m = metrics.segmentation_metrics(confusion, ['A', 'B', 'BACK'], 2)
  assert np.isnan(m['IoU/B']) and m['mIoU'] == pytest.approx(1.0)
  assert 'n/a' in metrics.format_metrics_table(m)


def test_confusion_matrix_counts_and_valid_mask():
  target = jnp.array([[0, 0, 1], [2, 2, 2]])
  pred = jnp.array([[0, 1, 1], [2, 0, 2]])
  np.testing.assert_array_equal(metrics.confusion_matrix(target, pred, 3),
                                [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
  valid = jnp.array([[True, True, True], [False, False, False]])
  np.testing.assert_array_equal(metrics.confusion_matrix(target, pred, 3, valid),
                                [[1, 1, 0], [0, 1, 0], [0, 0, 0]])


def test_table_lists_every_class():
  table = metrics.format_metrics_table(metrics.segmentation_metrics(CONFUSION, ['A', 'B', 'BACK'], 2))
  assert 'A' in table and 'BACK' in table and '42.86' in table  # IoU of A in %
