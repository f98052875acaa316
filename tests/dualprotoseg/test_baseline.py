"""The first-present-class baseline: hand-computed metrics, its CLI on a real split, its one-line refusals."""

import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import TINY_CONFIG_PATH, tiny_config

from protoseg_jax import errors, registry
from protoseg_jax.method import EvalSet
from protoseg_jax.methods.dualprotoseg import baseline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_first_present_mask_takes_the_lowest_present_class_or_background():
  np.testing.assert_array_equal(baseline.first_present_mask(np.array([0, 1, 1, 0]), 2, 3), np.full((2, 3), 1))
  np.testing.assert_array_equal(baseline.first_present_mask(np.array([0, 0, 0, 0]), 1, 1), [[4]])


def test_metrics_equal_a_hand_computed_confusion():
  # A: TUM + STR labelled -> all TUM; B: LYM -> all LYM, one unscored 255 pixel; C: no tissue -> BACK.
  masks = [np.array([[0, 1], [4, 4]], np.uint8), np.array([[2, 2], [2, 255]], np.uint8),
           np.full((2, 2), 4, np.uint8)]
  labels = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]], np.int32)
  method = registry.build(tiny_config())
  result = baseline.first_present_metrics(method, EvalSet(['a', 'b', 'c'], [None] * 3, masks, labels, 3))
  assert result['confusion_matrix'] == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 3, 0, 0], [0, 0, 0, 0, 0],
                                        [2, 0, 0, 0, 4]]
  assert result['IoU/TUM'] == pytest.approx(1 / 4) and result['IoU/STR'] == 0.0
  assert result['IoU/LYM'] == 1.0 and np.isnan(result['IoU/NEC'])        # NEC: absent from both
  assert result['IoU/BACK'] == pytest.approx(4 / 6)
  assert result['mIoU'] == pytest.approx((1 / 4 + 0 + 1) / 3)              # tissue classes, nanmean
  assert result['pixel_accuracy'] == pytest.approx(8 / 11)


def test_cli_prints_the_method_table_of_a_real_split(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run([sys.executable, '-m', 'protoseg_jax.methods.dualprotoseg.baseline',
                         f'--config={TINY_CONFIG_PATH}', f'--workdir={tmp_path}', '--split=val'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  config = tiny_config()
  method = registry.build(config)
  expected = baseline.first_present_metrics(method, method.eval_set(str(tmp_path), 'val', 0, 1))
  lines = done.stdout.splitlines()
  assert lines[0] == f'first-present-class baseline, val ({config.data.synthetic.num_val} tiles):'
  shown = float(re.search(r'^mIoU +([0-9.]+)$', done.stdout, re.MULTILINE).group(1))
  assert shown == pytest.approx(100 * expected['mIoU'], abs=0.005) and 0 < shown < 100


def cli(config, workdir: str, split: str = 'val') -> dict:
  return {'config': types.SimpleNamespace(value=config), 'workdir': types.SimpleNamespace(value=workdir),
          'split': types.SimpleNamespace(value=split)}


def test_bad_split_is_one_line_and_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as exited:
    baseline.main(['baseline'], cli(tiny_config(), str(tmp_path), 'nope'))
  assert exited.value.code == errors.EXIT_USER_ERROR
  assert capsys.readouterr().err == "error: unknown split 'nope': expected one of ['test', 'train', 'val']\n"


def test_a_split_without_image_level_labels_is_refused(tmp_path, capsys, monkeypatch):
  method_class = registry.get('dualprotoseg')
  unlabelled = lambda self, workdir, split, p, n: EvalSet(['a'], [None], [np.zeros((2, 2), np.uint8)],
                                                          np.full((1, 4), -1, np.int32), 1)
  monkeypatch.setattr(method_class, 'eval_set', unlabelled)
  with pytest.raises(SystemExit) as exited:
    baseline.main(['baseline'], cli(tiny_config(), str(tmp_path)))
  assert exited.value.code == errors.EXIT_USER_ERROR
  assert capsys.readouterr().err == ("error: split 'val' of method 'dualprotoseg' has no image-level labels: "
                                     'the first-present-class baseline needs them\n')
