"""Preemption and exact resume (DualProtoSeg through the core's loop): a run stopped by SIGTERM after step k and
restarted reaches the final step with parameters and optimizer state bitwise equal to an uninterrupted run;
interrupted saves are ignored."""

import logging
import os
import signal

import jax
import numpy as np
import pytest

from protoseg_jax import checkpoints, train_state, trainer
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod
import tiny_config

TOTAL_STEPS = 6


def resume_config():
  config = tiny_config.get_config()
  config.train.max_steps = TOTAL_STEPS
  config.train.log_every_steps = 1
  config.checkpoint.every_steps = 2
  config.checkpoint.keep = 2
  config.eval.update(hflip=False, intensity_factors=(1.0,))  # a cheaper eval; resume is what is tested
  return config


def final_state(config, workdir):
  method = DualProtoSegMethod(config)
  params, extra = method.init_variables(jax.random.key(0))
  optimizer, _ = method.optimizer(method.split_params(params)[0], 1)
  target = trainer.resumable(train_state.create_train_state(params, extra, optimizer, method))
  manager = checkpoints.TrainCheckpoints(os.path.join(workdir, 'checkpoints'), keep=2, async_save=False)
  assert manager.latest_step() == TOTAL_STEPS
  return manager.restore(TOTAL_STEPS, target)


@pytest.mark.slow
def test_sigterm_then_resume_is_bitwise_exact(tmp_path, caplog):
  config = resume_config()
  uninterrupted, interrupted = str(tmp_path / 'uninterrupted'), str(tmp_path / 'interrupted')
  config.data.root = str(tmp_path / 'data')  # one synthetic set for both runs
  trainer.train_and_evaluate(DualProtoSegMethod(config), config, uninterrupted)

  def preempt_after_step_3(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # what a preemption notice looks like to the process
    return False

  result = trainer.train_and_evaluate(DualProtoSegMethod(config), config, interrupted,
                                      should_stop=preempt_after_step_3)
  assert result['stopped_at_step'] == 3 and result['signal'] == 'SIGTERM'
  steps_dir = os.path.join(interrupted, 'checkpoints', 'steps')
  assert sorted(int(name) for name in os.listdir(steps_dir) if name.isdigit()) == [2, 3]
  # A save that was killed half-way leaves a temporary directory: it must be ignored, with a warning.
  leftover = os.path.join(steps_dir, '5.orbax-checkpoint-tmp-1700000000')
  os.makedirs(os.path.join(leftover, 'state'))
  with open(os.path.join(leftover, 'state', 'partial'), 'wb') as handle:
    handle.write(b'\0' * 10)
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(DualProtoSegMethod(config), config, interrupted)
  assert any('interrupted checkpoint save' in record.getMessage() and '5.orbax-checkpoint-tmp' in
             record.getMessage() for record in caplog.records)
  assert not os.path.exists(leftover)

  expected, expected_data, _ = final_state(config, uninterrupted)
  resumed, resumed_data, _ = final_state(config, interrupted)
  assert resumed_data == expected_data
  expected_leaves, resumed_leaves = jax.tree.leaves(expected), jax.tree.leaves(resumed)
  assert len(expected_leaves) == len(resumed_leaves)
  for want, got in zip(expected_leaves, resumed_leaves):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_wrong_architecture_names_the_first_mismatched_key(tmp_path):
  import jax.numpy as jnp

  manager = checkpoints.TrainCheckpoints(str(tmp_path), keep=1, async_save=False)
  state = {'step': jnp.zeros((), jnp.int32),
           'trainable': {'shared_decoder': {'input_conv': {'kernel': jnp.ones((1, 1, 32, 16))}},
                         'text_proj': {'kernel': jnp.ones((16, 16))}}}
  manager.save(1, state, {'step': 1}, {'step': 1})
  manager.wait()
  wrong = {'step': jnp.zeros((), jnp.int32),
           'trainable': {'shared_decoder': {'input_conv': {'kernel': jnp.ones((1, 1, 32, 8))}},
                         'text_proj': {'kernel': jnp.ones((16, 16))}}}
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'trainable/shared_decoder/input_conv/kernel has shape \(1, 1, 32, 16\) in the '
                           r'checkpoint but \(1, 1, 32, 8\) in the model'):
    manager.restore(1, wrong)
  missing = {'step': state['step'], 'trainable': {'text_proj': state['trainable']['text_proj']}}
  with pytest.raises(checkpoints.CheckpointError,
                     match='trainable/shared_decoder/input_conv/kernel is in the checkpoint but not in the model'):
    manager.restore(1, missing)
