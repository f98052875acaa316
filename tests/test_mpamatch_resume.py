"""MPAMatch preemption and resume: a run stopped after step 2 and restarted ends with the same parameters,
BatchNorm statistics, prototype bank and optimizer state as an uninterrupted run; checkpoint errors."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mpamatch_demo  # noqa: E402
from protoseg_jax import checkpoints  # noqa: E402
from protoseg_jax.mpamatch import train, trainer  # noqa: E402

TOTAL_STEPS = 4


def resume_config(data_root):
  config = mpamatch_demo.get_config()
  config.data.root = data_root
  config.data.synthetic.update(num_train=16, num_val=2, num_test=2, render_size=40)
  config.data.update(image_size=32, train_window=32, labelled_fraction=0.25)
  config.eval.update(stride=16, batch_size=4)
  config.model.vit.update(width=16, depth=1, num_heads=2, pos_embed_grid=4, taps=(0,))
  config.model.update(bottleneck_channels=8, decoder_channels=(4, 4, 4), embed_hidden=8, embed_dim=8)
  config.model.text.update(width=8, depth=1, embed_dim=8)
  config.train.update(steps=TOTAL_STEPS, eval_every_steps=TOTAL_STEPS, log_every_steps=1,
                      labelled_batch_size=2, unlabelled_batch_size=2)
  config.checkpoint.update(every_steps=2, keep=2, async_save=False)
  return config


def final_state(config, workdir):
  model, prompt_ids = train.build_model(config)
  params, batch_stats = train.init_variables(config, model, prompt_ids, jax.random.key(0))
  optimizer, _ = train.make_optimizer(config.train, 1)
  state = train.create_train_state(params, batch_stats, optimizer, model.config.num_classes,
                                   model.config.embed_dim)
  manager = checkpoints.TrainCheckpoints(os.path.join(workdir, 'checkpoints'), keep=2, async_save=False)
  assert manager.latest_step() == TOTAL_STEPS
  restored, data_state, meta = manager.restore(TOTAL_STEPS, trainer.resumable(state))
  return restored, data_state, meta


def test_stop_then_resume_matches_the_uninterrupted_run(tmp_path):
  config = resume_config(str(tmp_path / 'data'))
  uninterrupted, interrupted = str(tmp_path / 'uninterrupted'), str(tmp_path / 'interrupted')
  trainer.train_and_evaluate(config, uninterrupted)
  stopped = trainer.train_and_evaluate(config, interrupted, should_stop=lambda step: step == 2)
  assert stopped['stopped_at_step'] == 2
  steps_dir = os.path.join(interrupted, 'checkpoints', 'steps')
  assert sorted(int(name) for name in os.listdir(steps_dir) if name.isdigit()) == [2]
  result = trainer.train_and_evaluate(config, interrupted)
  assert result['step'] == TOTAL_STEPS and 0.0 <= result['mIoU_all'] <= 1.0

  expected, expected_data, _ = final_state(config, uninterrupted)
  resumed, resumed_data, meta = final_state(config, interrupted)
  assert resumed_data == expected_data == {'step': TOTAL_STEPS}
  assert meta['variant'] == 'mpamatch'
  assert bool(np.asarray(resumed['bank']['seen']).any())  # the bank really was filled and saved
  flat_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
  flat_resumed = jax.tree.leaves(resumed)
  assert len(flat_expected) == len(flat_resumed)
  for (path, want), got in zip(flat_expected, flat_resumed):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))

  # eval / predict restore both names; a run of another variant in the same workdir is refused
  _, probs_fn, best_meta = trainer.restore(config, interrupted, 'best')
  windows = np.zeros((config.eval.batch_size, 32, 32, 3), np.uint8)
  assert np.asarray(probs_fn(windows)).shape == (4, 32, 32, 5) and best_meta['step'] == TOTAL_STEPS
  config.loss.variant = 'unimatch'
  with pytest.raises(checkpoints.CheckpointError, match="holds a 'mpamatch' run"):
    trainer.train_and_evaluate(config, interrupted)


def test_restore_errors_name_the_problem(tmp_path):
  config = resume_config(str(tmp_path / 'data'))
  with pytest.raises(checkpoints.CheckpointError, match='train first'):
    trainer.restore(config, str(tmp_path / 'empty'), 'best')
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint 'latest'"):
    trainer.restore(config, str(tmp_path / 'empty'), 'latest')
