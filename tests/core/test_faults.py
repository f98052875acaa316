"""Faults and bad input the core survives, each a one-line message naming the file, key or step: corrupt or
half-deleted checkpoints (moved aside, the next intact one used), SIGINT (saved like SIGTERM), a NaN loss (the
run stops, nothing NaN is saved), a changed run-defining config on resume (refused, listing the keys),
`--checkpoint=<step>`. Driven through the tests-only toy method (tests/toy_method.py), in process."""

import glob
import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest

import toy_method
from protoseg_jax import errors, main, trainer

toy_method.register()


def toy_config(**train):
  config = toy_method.get_config()
  config.train.update(**train)
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A complete 6-step toy run: step checkpoints 2, 3, 4, 6 and best among 3, 6."""
  workdir = str(tmp_path_factory.mktemp('toy') / 'run')
  assert main.run(toy_config(), workdir, 'train') == errors.EXIT_OK
  return workdir


def copy_run(trained, tmp_path) -> str:
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  return workdir


def _steps(workdir, kind='steps'):
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints', kind)) if name.isdigit())


def _corrupt(step_dir: str, how: str) -> None:
  if how == 'truncated array file':
    files = [path for path in glob.glob(os.path.join(step_dir, 'state', '**', '*'), recursive=True)
             if os.path.isfile(path) and os.sep + 'd' + os.sep in path]
    assert files, os.listdir(os.path.join(step_dir, 'state'))
    for path in files:
      with open(path, 'r+b') as handle:
        handle.truncate(max(os.path.getsize(path) // 2, 1))
  elif how == 'garbage metadata':
    for name in ('_METADATA', 'manifest.ocdbt'):
      with open(os.path.join(step_dir, 'state', name), 'wb') as handle:
        handle.write(b'\x00garbage{{{')
  elif how == 'missing item':
    shutil.rmtree(os.path.join(step_dir, 'meta'))
  else:
    raise ValueError(how)


def _restore_last(workdir):
  method = toy_method.ToyMethod(toy_config())
  return trainer.restore_weights(method, toy_config(), workdir, 'last')


@pytest.mark.slow
@pytest.mark.parametrize('how', ['truncated array file', 'garbage metadata', 'missing item'])
def test_corrupt_newest_checkpoint_is_moved_aside_and_the_run_resumes(trained, tmp_path, caplog, how):
  workdir = copy_run(trained, tmp_path)
  _corrupt(os.path.join(workdir, 'checkpoints', 'steps', '6'), how)
  with caplog.at_level(logging.WARNING):
    assert main.run(toy_config(), workdir, 'train') == errors.EXIT_OK
  warnings = [r.getMessage() for r in caplog.records if 'is unreadable' in r.getMessage()]
  assert warnings and os.path.join('steps', '6') in warnings[0]
  moved = glob.glob(os.path.join(workdir, 'checkpoints', 'corrupt', 'steps-6-*'))
  assert len(moved) == 1 and os.listdir(moved[0])  # moved aside, not deleted
  assert _steps(workdir) == [2, 3, 4, 6]           # resumed from 4 and trained steps 5, 6 again
  _, extra, meta, _, _ = _restore_last(workdir)
  assert meta['step'] == 6 and int(extra['steps_seen']) == 6


@pytest.mark.slow
def test_corrupt_best_falls_back_to_the_next_best(trained, tmp_path, caplog):
  workdir = copy_run(trained, tmp_path)
  best_steps = _steps(workdir, 'best')
  assert len(best_steps) == 2
  method = toy_method.ToyMethod(toy_config())
  _, _, meta, _, _ = trainer.restore_weights(method, toy_config(), workdir, 'best')
  best = meta['step']
  _corrupt(os.path.join(workdir, 'checkpoints', 'best', str(best)), 'missing item')
  with caplog.at_level(logging.WARNING):
    _, _, meta, _, _ = trainer.restore_weights(method, toy_config(), workdir, 'best')
  assert meta['step'] == [step for step in best_steps if step != best][0]
  assert any(os.path.join('best', str(best)) in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_named_step_and_unknown_step(trained):
  method = toy_method.ToyMethod(toy_config())
  _, extra, meta, _, _ = trainer.restore_weights(method, toy_config(), trained, 4)
  assert meta['step'] == 4 and int(extra['steps_seen']) == 4
  with pytest.raises(errors.CheckpointError, match=r'no checkpoint step 5 under .* \(kept steps: 2, 3, 4, 6\)'):
    trainer.restore_weights(method, toy_config(), trained, 5)
  with pytest.raises(errors.ConfigError, match=r"--checkpoint must be 'best', 'last' or a kept step number, "
                                                r"got 'latest'"):
    trainer.parse_checkpoint_choice('latest')


@pytest.mark.slow
def test_resume_with_changed_run_defining_config_is_refused_unless_allowed(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', 'steps', '6'))
  changed = toy_config(learning_rate=0.5, steps=8)
  with pytest.raises(errors.CheckpointError) as raised:
    main.run(changed, workdir, 'train')
  message = str(raised.value)
  assert 'changed: config.train.learning_rate: 0.05 -> 0.5; config.train.steps: 6 -> 8' in message
  assert '\n' not in message
  changed.checkpoint.allow_config_change = True
  assert main.run(changed, workdir, 'train') == errors.EXIT_OK
  assert _steps(workdir)[-1] == 8


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(errors.NonFiniteLossError, match=r'^step 5: the loss is NaN or Inf; training stopped at the '
                                                      r'check after step 6 and saved nothing of it \(the last '
                                                      r'checkpoint \(step 4\) is intact'):
    main.run(toy_config(nan_from_step=4), workdir, 'train')
  assert _steps(workdir) == [2, 3, 4]    # nothing saved after the bad step
  _, extra, meta, _, _ = _restore_last(workdir)
  assert meta['step'] == 4 and int(extra['steps_seen']) == 4
  method = toy_method.ToyMethod(toy_config())
  params, _, best_meta, _, _ = trainer.restore_weights(method, toy_config(), workdir, 'best')
  assert best_meta['step'] == 3
  assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(params))


@pytest.mark.slow
def test_sigint_saves_like_sigterm(tmp_path):
  workdir = str(tmp_path / 'run')
  method = toy_method.ToyMethod(toy_config())

  def ctrl_c_after_step_2(step):
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return False

  result = trainer.train_and_evaluate(method, toy_config(), workdir, should_stop=ctrl_c_after_step_2)
  assert result['stopped_at_step'] == 2 and result['signal'] == 'SIGINT'
  assert _steps(workdir) == [2]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
