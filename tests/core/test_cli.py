"""The command line as a user runs it (DualProtoSeg's tiny config): train, eval, predict, export, and one-line
errors, with exit code 2, for every kind of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CONFIG_PATH

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(*args, check=True, platforms='cpu'):
  """`platforms=None` leaves JAX_PLATFORMS unset, as a user's shell does (JAX then probes every platform)."""
  env = {key: value for key, value in os.environ.items() if key != 'JAX_PLATFORMS'}
  if platforms:
    env['JAX_PLATFORMS'] = platforms
  result = subprocess.run([sys.executable, '-m', 'protoseg_jax.main', f'--config={TINY_CONFIG_PATH}', *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  if check and result.returncode != 0:
    raise AssertionError(f'exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}')
  return result


def one_line_error(result, *fragments):
  """Exit code 2 and exactly one `error: ...` line on stderr holding every fragment, no traceback."""
  assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  result = run_main(f'--workdir={workdir}', platforms=None)
  return workdir, result


@pytest.mark.slow
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
  best = sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints', 'best')))
  best_epoch = max(eval_lines, key=lambda line: line['mIoU'])['step']
  assert best == [4, 8] and f'best checkpoint: step {best_epoch} (val mIoU' in result.stdout
  assert os.path.isfile(os.path.join(workdir, 'log.INFO')) and os.listdir(os.path.join(workdir, 'tensorboard'))
  assert "Unable to initialize backend 'tpu'" not in result.stderr + open(os.path.join(workdir, 'log.INFO')).read()


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
  assert exported_config['channel_order'] == 'bgr'
  run_main(f'--workdir={workdir}', '--mode=export', f'--out={out}', '--checkpoint=4')  # replaced atomically
  assert sorted(os.listdir(os.path.dirname(out))).count('exported') == 1
  assert not [name for name in os.listdir(os.path.dirname(out)) if name.startswith('.exported')]


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


def test_predict_reads_images_of_any_size(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (50, 41, 3), np.uint8)).save(tmp_path / 'odd.png')
  Image.fromarray(rng.integers(0, 256, (20, 20), np.uint8), mode='L').save(tmp_path / 'small_grey.png')
  run_main(f'--workdir={workdir}', '--mode=predict', f'--input={tmp_path}/*.png', f'--out={tmp_path}/out')
  assert Image.open(tmp_path / 'out' / 'masks' / 'odd.png').size == (41, 50)
  assert Image.open(tmp_path / 'out' / 'masks' / 'small_grey.png').size == (20, 20)


@pytest.mark.parametrize('args, fragments', [
    (('--config=nowhere.py',), ('--config=nowhere.py',)),
    (('--config.train.batch_sise=8',), ('unknown config key config.train.batch_sise', 'config.train.batch_size')),
    (('--config.train.epochs=two',), ('--config.train.epochs=two',)),
    (('--config.train.epochs=0',), ('config.train.epochs',)),
    (('--config.train.epochs=-3',), ('config.train.epochs=-3 must be positive',)),
    (('--mode=dance',), ('--mode=dance',)),
    (('--config.method=nope',), ("config.method='nope'", 'protoseg_jax.methods.nope')),
])
def test_bad_flags_and_config_are_one_line(tmp_path, args, fragments):
  config = [] if any(arg.startswith('--config=') for arg in args) else [f'--config={TINY_CONFIG_PATH}']
  result = subprocess.run([sys.executable, '-m', 'protoseg_jax.main', *config, f'--workdir={tmp_path}', *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  one_line_error(result, *fragments)


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  target = tmp_path / 'a_file'
  target.write_text('x')
  one_line_error(run_main(f'--workdir={target}', check=False), f'--workdir={target} is a file')


def test_bad_training_tile_is_named_before_anything_compiles(tmp_path):
  root = tmp_path / 'data'
  (root / 'training').mkdir(parents=True)
  for index in range(4):
    Image.fromarray(np.full((32, 32, 3), 120 + index, np.uint8)).save(root / 'training' / f'ok{index}[1000].png')
  Image.new('CMYK', (32, 32)).save(root / 'training' / 'cmyk[0100].jpg')
  (root / 'val').mkdir()
  result = run_main(f'--workdir={tmp_path}/run', '--config.data.kind=folder', f'--config.data.root={root}',
                    check=False)
  line = one_line_error(result, 'cmyk[0100].jpg')
  assert 'compil' not in result.stderr.lower().split(line)[0][-2000:]


def test_checkpoint_choice_errors(trained_workdir):
  workdir, _ = trained_workdir
  one_line_error(run_main(f'--workdir={workdir}', '--mode=eval', '--checkpoint=newest', check=False),
                 "--checkpoint must be 'best', 'last' or a kept step number, got 'newest'")
  one_line_error(run_main(f'--workdir={workdir}', '--mode=eval', '--checkpoint=5', check=False),
                 'no checkpoint step 5', 'kept steps: 4, 8')


def test_missing_data_folder_is_one_clear_line(tmp_path):
  result = run_main(f'--workdir={tmp_path}', '--config.data.kind=folder',
                    f'--config.data.root={tmp_path}/nowhere', check=False)
  one_line_error(result, 'nowhere')


def test_eval_without_checkpoint_is_one_clear_line(tmp_path):
  one_line_error(run_main(f'--workdir={tmp_path}', '--mode=eval', check=False), 'no checkpoints under')
