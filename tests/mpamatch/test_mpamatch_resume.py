"""MPAMatch preemption and resume through the core's training loop: a run stopped after step 2 and restarted
ends with bitwise the same parameters, BatchNorm statistics, prototype bank and optimizer state as an
uninterrupted run; restored weights feed the core's evaluator; checkpoint errors name the problem."""

import os

import jax
import numpy as np
import pytest

from conftest import tiny_mpamatch_config
from protoseg_jax import checkpoints, evaluation, train_state, trainer
from protoseg_jax.errors import CheckpointError, ConfigError
from protoseg_jax.methods.mpamatch.method import MPAMatchMethod

TOTAL_STEPS = 4


def resume_config(data_root):
  config = tiny_mpamatch_config(data_root, num_val=2)
  config.train.update(steps=TOTAL_STEPS, eval_every_steps=TOTAL_STEPS)
  config.checkpoint.update(every_steps=2, keep=2, async_save=False)
  return config


def final_state(method, config, workdir):
  """The step-4 checkpoint of `workdir`: (state dict, data iterator state, meta)."""
  params, extra = method.init_variables(jax.random.key(0))
  optimizer, _ = method.optimizer(method.split_params(params)[0], 1)
  state = train_state.create_train_state(params, extra, optimizer, method)
  manager = checkpoints.TrainCheckpoints(os.path.join(workdir, 'checkpoints'), keep=2, async_save=False)
  try:
    assert manager.latest_step() == TOTAL_STEPS
    return manager.restore(TOTAL_STEPS, trainer.resumable(state))
  finally:
    manager.close()


def assert_trees_equal(got, want):
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  flat_got = jax.tree.leaves(got)
  assert len(flat_want) == len(flat_got)
  for (path, expected), value in zip(flat_want, flat_got):
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_stop_then_resume_matches_the_uninterrupted_run(tmp_path):
  config = resume_config(str(tmp_path / 'data'))
  method = MPAMatchMethod(config)
  uninterrupted, interrupted = str(tmp_path / 'uninterrupted'), str(tmp_path / 'interrupted')
  trainer.train_and_evaluate(method, config, uninterrupted)
  stopped = trainer.train_and_evaluate(method, config, interrupted, should_stop=lambda step: step == 2)
  assert stopped['stopped_at_step'] == 2
  steps_dir = os.path.join(interrupted, 'checkpoints', 'steps')
  assert sorted(int(name) for name in os.listdir(steps_dir) if name.isdigit()) == [2]
  result = trainer.train_and_evaluate(method, config, interrupted)
  assert result['step'] == TOTAL_STEPS and 0.0 <= result['mIoU_all'] <= 1.0

  expected, expected_data, _ = final_state(method, config, uninterrupted)
  resumed, resumed_data, meta = final_state(method, config, interrupted)
  assert resumed_data['step'] == expected_data['step'] == TOTAL_STEPS
  assert resumed_data == expected_data, (resumed_data, expected_data)  # the same position in the data stream
  assert meta['config']['loss.variant'] == 'mpamatch'  # the run's (flattened) config travels with it
  assert set(resumed) == {'step', 'trainable', 'extra', 'opt_state'}
  assert set(resumed['extra']) == {'batch_stats', 'bank'}
  assert bool(np.asarray(resumed['extra']['bank'].seen).any())  # the bank really was filled and saved
  # Bitwise: params, BatchNorm statistics, prototype bank, Adam moments and counts.
  assert_trees_equal(resumed, expected)

  # eval / predict / export restore the best weights (= step 4 here) and score windows with them
  params, extra, best_meta, mesh, shardings = trainer.restore_weights(method, config, interrupted, 'best')
  assert best_meta['step'] == TOTAL_STEPS
  assert_trees_equal({'trainable': {key: params[key] for key in resumed['trainable']}, 'extra': extra},
                     {'trainable': resumed['trainable'], 'extra': resumed['extra']})
  evaluator = evaluation.Evaluator(method, config, mesh, {**shardings.frozen, **shardings.trainable},
                                   shardings.extra)
  windows = np.zeros((config.eval.batch_size, 32, 32, 3), np.uint8)
  labels = np.full((config.eval.batch_size, 5), -1, np.int32)
  scores = evaluator.scores_call(params, extra, evaluator.statics(params, extra))(windows, labels)
  assert scores.shape == (4, 32, 32, 5)
  np.testing.assert_allclose(scores.sum(axis=-1), 1.0, rtol=1e-5)  # softmax over the five values

  # a run of another variant in the same workdir is refused, naming the changed key
  config.loss.variant = 'unimatch'
  with pytest.raises(CheckpointError, match='config.loss.variant'):
    trainer.train_and_evaluate(MPAMatchMethod(config), config, interrupted)


def test_restore_errors_name_the_problem(tmp_path):
  config = resume_config(str(tmp_path / 'data'))
  method = MPAMatchMethod(config)
  with pytest.raises(CheckpointError, match='train first'):
    trainer.restore_weights(method, config, str(tmp_path / 'empty'), 'best')
  with pytest.raises(ConfigError, match="'best', 'last' or a kept step number, got 'latest'"):
    trainer.parse_checkpoint_choice('latest')
