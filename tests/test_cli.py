"""The command line as a user runs it: train, eval, predict, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CONFIG_PATH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, check=True):
  result = subprocess.run([sys.executable, '-m', 'protoseg_jax.main', f'--config={TINY_CONFIG_PATH}', *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  if check and result.returncode != 0:
    raise AssertionError(f'exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}')
  return result


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  result = run_main(f'--workdir={workdir}')
  return workdir, result


def test_train_writes_metrics_checkpoints_and_prints_table(trained_workdir):
  workdir, result = trained_workdir
  assert 'mIoU' in result.stdout and 'TUM' in result.stdout
  train_lines = [json.loads(line) for line in open(os.path.join(workdir, 'train_metrics.jsonl'))]
  eval_lines = [json.loads(line) for line in open(os.path.join(workdir, 'eval_metrics.jsonl'))]
  assert [line['step'] for line in train_lines] == [2, 4, 6, 8]  # 16 tiles / batch 4 x 2 epochs
  assert [line['step'] for line in eval_lines] == [4, 8]
  assert all(np.isfinite(line['loss']) for line in train_lines)
  confusion = np.asarray(eval_lines[-1]['confusion_matrix'])
  assert confusion.shape == (5, 5) and confusion.sum() == 6 * 32 * 32  # every val pixel counted once
  steps = sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints', 'steps')))
  assert steps == [4, 8]  # saved at each validation (checkpoint.every_steps is larger than the run)
  best = [int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints', 'best'))]
  best_epoch_miou = max(eval_lines, key=lambda line: line['mIoU'])
  assert best == [best_epoch_miou['step']]


def test_export_mode_writes_safetensors_and_config(trained_workdir):
  from safetensors.numpy import load_file

  workdir, _ = trained_workdir
  out = os.path.join(workdir, 'exported')
  run_main(f'--workdir={workdir}', '--mode=export', f'--out={out}')
  model = load_file(os.path.join(out, 'dualprotoseg.safetensors'))
  trunk = load_file(os.path.join(out, 'trunk_timm.safetensors'))
  assert 'shared_decoder.proj.0.weight' in model and 'logit_scale4' in model
  assert model['clip_adapter.prompt_learner.ctx'].shape == (4, 2, 16)  # tiny config: C=4, n_ctx=2, D=16
  assert set(trunk) == {key[len('clip_adapter.model.visual.trunk.'):] for key in model
                        if key.startswith('clip_adapter.model.visual.trunk.')}
  exported_config = json.load(open(os.path.join(out, 'export_config.json')))
  assert exported_config['layouts'] == {'conv': 'OIHW', 'linear': '[out, in]'}


def test_eval_mode_reproduces_the_training_validation(trained_workdir):
  workdir, _ = trained_workdir
  run_main(f'--workdir={workdir}', '--mode=eval', '--checkpoint=last', '--split=val')
  evaluated = json.load(open(os.path.join(workdir, 'eval_val.json')))
  last_training_eval = [json.loads(line) for line in open(os.path.join(workdir, 'eval_metrics.jsonl'))][-1]
  assert evaluated['confusion_matrix'] == last_training_eval['confusion_matrix']


def test_predict_writes_palette_masks_and_overlays(trained_workdir):
  workdir, _ = trained_workdir
  input_dir = os.path.join(workdir, 'synthetic_bcss', 'test', 'img')
  run_main(f'--workdir={workdir}', '--mode=predict', f'--config.predict.input_dir={input_dir}')
  names = sorted(os.listdir(input_dir))
  masks_dir = os.path.join(workdir, 'predictions', 'masks')
  assert sorted(os.listdir(masks_dir)) == names
  mask = Image.open(os.path.join(masks_dir, names[0]))
  assert mask.mode == 'P' and mask.size == (32, 32) and np.asarray(mask).max() <= 4
  assert mask.getpalette()[:6] == [255, 0, 0, 0, 255, 0]
  overlay = Image.open(os.path.join(workdir, 'predictions', 'overlays', names[0]))
  assert overlay.mode == 'RGB' and overlay.size == (32, 32)


def test_missing_data_folder_is_one_clear_line(tmp_path):
  result = run_main(f'--workdir={tmp_path}', '--config.data.kind=folder',
                    f'--config.data.root={tmp_path}/nowhere', check=False)
  assert result.returncode == 2
  assert 'nowhere' in result.stderr and 'Traceback' not in result.stderr


def test_unknown_config_key_is_rejected(tmp_path):
  result = run_main(f'--workdir={tmp_path}', '--config.train.batch_sise=8', check=False)
  assert result.returncode != 0 and 'batch_sise' in result.stderr


def test_eval_without_checkpoint_is_one_clear_line(tmp_path):
  result = run_main(f'--workdir={tmp_path}', '--mode=eval', check=False)
  assert result.returncode == 2 and 'no checkpoint' in result.stderr and 'Traceback' not in result.stderr
