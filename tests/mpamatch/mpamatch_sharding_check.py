"""Runs in its own process with 8 simulated CPU devices (tests/mpamatch/test_mpamatch_sharding.py starts it).

Two MPAMatch train steps (variant 'mpamatch': BatchNorm, pseudo-labels, CutMix partners, prototype bank) on
the same global batch on 1 device and on a (data 2, fsdp 4) mesh, through the core's sharded state and
jitted (guarded) step, plus the core evaluator's window scores on both; prints one JSON line: losses,
largest differences, and the layout of a decoder kernel and its Adam moment.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: simulated_devices
sys.path.insert(0, HERE)                   # tests/mpamatch/: test_mpamatch_step
import simulated_devices  # noqa: E402

simulated_devices.enable()  # before JAX is imported

import json  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository: protoseg_jax, configs

import jax  # noqa: E402
import numpy as np  # noqa: E402

from protoseg_jax import evaluation, sharding, train_state  # noqa: E402
from protoseg_jax.methods.mpamatch.method import MPAMatchMethod  # noqa: E402
from test_mpamatch_step import fixed_batch, tiny_config  # noqa: E402

STEPS = 2
MESH = {'data': 2, 'fsdp': 4, 'tensor': 1}


def run(config, devices, mesh_config):
  mesh = sharding.make_mesh(mesh_config, devices)
  rules = config.sharding.logical_rules
  method = MPAMatchMethod(config)
  params, extra = method.init_variables(jax.random.key(0))
  trainable, _ = method.split_params(params)
  optimizer, schedules = method.optimizer(trainable, total_steps=100)
  initial = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), trainable)
  state, shardings = train_state.create_sharded_train_state(params, extra, optimizer, method, mesh, rules)
  step = train_state.jit_train_step(method, optimizer, schedules, mesh, shardings, rules)
  batch = fixed_batch(8)
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, sharding.shard_host_batch(batch, mesh), jax.random.key(1))
    losses.append(float(metrics['loss']))
  assert int(state.nonfinite_step) == -1 and int(state.step) == STEPS
  evaluator = evaluation.Evaluator(method, config, mesh, {**shardings.frozen, **shardings.trainable},
                                   shardings.extra)
  labels = np.full((len(batch['x']), method.num_label_classes), -1, np.int32)
  probs = evaluator.scores_call(state.params, state.extra, evaluator.statics(state.params, state.extra))(
      batch['x'], labels)
  kernel = state.trainable['decoder']['block0_conv1']['conv']['kernel']
  head_state = state.opt_state.inner_states['head'].inner_state[0]
  moment = head_state.mu['decoder']['block0_conv1']['conv']['kernel']
  layout = {name: [list(leaf.sharding.spec), list(leaf.addressable_shards[0].data.shape)]
            for name, leaf in (('kernel', kernel), ('adam_mu', moment))}
  host = lambda tree: jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf), np.float64), tree)
  return dict(initial=initial, losses=losses, trainable=host(state.trainable),
              batch_stats=host(state.extra['batch_stats']), bank=host(state.extra['bank'].prototypes),
              probs=np.asarray(probs, np.float64), layout=layout, mesh=dict(mesh.shape))


def max_difference(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  config = tiny_config()
  # eps 1e-3: Adam's first steps turn any gradient near 0 into +-lr, which would amplify reduction-order
  # noise into parameter differences; with a large eps the update stays proportional to the gradient.
  config.train.update(labelled_batch_size=8, unlabelled_batch_size=8, adam_eps=1e-3)
  config.eval.batch_size = 8  # the 8 windows of the batch in one call, split over the 8 devices
  single = run(config, jax.devices()[:1], {'data': 1, 'fsdp': 1, 'tensor': 1})
  sharded = run(config, jax.devices(), MESH)
  result = {
      'single_losses': single['losses'], 'sharded_losses': sharded['losses'], 'mesh': sharded['mesh'],
      'max_update': max_difference(single['initial'], single['trainable']),
      'max_param_diff': max_difference(single['trainable'], sharded['trainable']),
      'max_batch_stats_diff': max_difference(single['batch_stats'], sharded['batch_stats']),
      'max_bank_diff': float(np.max(np.abs(single['bank'] - sharded['bank']))),
      'max_probs_diff': float(np.max(np.abs(single['probs'] - sharded['probs']))),
      'layout': sharded['layout'], 'single_layout': single['layout'],
  }
  print('RESULT ' + json.dumps(result))


if __name__ == '__main__':
  main()
