"""The method interface is real: a tests-only toy method (tests/toy_method.py), registered from its config file
the way a third-party method package would be, runs train -> resume -> eval -> predict -> export through the
core's CLI, touching no core file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

import toy_method
from conftest import HERE

REPO = os.path.dirname(HERE)
TOY_CONFIG = os.path.join(HERE, 'toy_config.py')


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'protoseg_jax.main', f'--config={TOY_CONFIG}', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _steps(workdir):
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints', 'steps')) if name.isdigit())


@pytest.mark.slow
def test_toy_method_train_interrupt_resume_eval_predict_export(tmp_path):
  workdir = str(tmp_path / 'run')
  # Ctrl-C after the 4th batch: a checkpoint is saved after that step, exit code 75 (resume).
  interrupted = run_cli(f'--workdir={workdir}', '--config.train.interrupt_after_batches=4')
  assert interrupted.returncode == 75, interrupted.stderr[-3000:]
  assert 'stopped at step 4 (SIGINT)' in interrupted.stdout
  assert _steps(workdir) == [2, 3, 4]
  resumed = run_cli(f'--workdir={workdir}', '--config.train.interrupt_after_batches=4')  # the same config
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step 4' in open(os.path.join(workdir, 'log.INFO')).read()
  assert _steps(workdir) == [2, 3, 4, 6]
  train_steps = [json.loads(line)['step'] for line in open(os.path.join(workdir, 'train_metrics.jsonl'))]
  assert train_steps == [2, 4, 6]
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert 'best checkpoint: step' in resumed.stdout

  evaluated = run_cli(f'--workdir={workdir}', '--mode=eval', '--checkpoint=last', '--split=val')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.load(open(os.path.join(workdir, 'eval_val.json')))
  last_validation = [json.loads(line) for line in open(os.path.join(workdir, 'eval_metrics.jsonl'))][-1]
  assert result['confusion_matrix'] == last_validation['confusion_matrix']
  assert np.sum(result["confusion_matrix"]) == 4 * 32 * 32  # the 4 val tiles, every pixel once

  inputs = tmp_path / 'inputs'
  inputs.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (45, 70, 3), np.uint8)).save(inputs / 'odd.png')  # not one tile
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(inputs / 'tile.png')
  predicted = run_cli(f'--workdir={workdir}', '--mode=predict', f'--input={inputs}', '--checkpoint=4')
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  mask = toy_method.read_palette_png(os.path.join(workdir, 'predictions', 'masks', 'odd.png'))
  assert mask.shape == (45, 70)
  assert os.path.isfile(os.path.join(workdir, 'predictions', 'overlays', 'tile.png'))

  exported = run_cli(f'--workdir={workdir}', '--mode=export', '--checkpoint=last')
  assert exported.returncode == 0, exported.stderr[-3000:]
  tensors = load_file(os.path.join(workdir, 'export', 'toy.safetensors'))
  assert tensors['head.weight'].shape == (5, 8, 3, 3)
  assert int(tensors['steps_seen']) == 6  # the extra state was checkpointed and restored with the weights
