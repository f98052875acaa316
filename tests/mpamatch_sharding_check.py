"""Runs in its own process with 8 simulated CPU devices (tests/test_mpamatch_sharding.py starts it).

Two MPAMatch train steps (variant 'mpamatch': BatchNorm, pseudo-labels, CutMix partners, prototype bank) on
the same global batch on 1 device and on a (data 2, fsdp 4) mesh, plus the sliding-window head on both;
prints one JSON line: losses, largest differences, and the layout of a decoder kernel and its Adam moment.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import simulated_devices  # noqa: E402

simulated_devices.enable()  # before JAX is imported

import json  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from protoseg_jax import sharding  # noqa: E402
from protoseg_jax.mpamatch import train  # noqa: E402
from test_mpamatch_step import fixed_batch, tiny_config  # noqa: E402

STEPS = 2
MESH = {'data': 2, 'fsdp': 4, 'tensor': 1}


def run(config, devices, mesh_config):
  mesh = sharding.make_mesh(mesh_config, devices)
  model, prompt_ids = train.build_model(config)
  params, batch_stats = train.init_variables(config, model, prompt_ids, jax.random.key(0))
  optimizer, schedules = train.make_optimizer(config.train, total_steps=100)
  initial = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), train.split_params(params)[0])
  state, shardings = train.create_sharded_train_state(params, batch_stats, optimizer, model.config.num_classes,
                                                      model.config.embed_dim, mesh, config.sharding.logical_rules)
  step = train.make_train_step(model, config, prompt_ids, optimizer, schedules, mesh, shardings)
  batch = fixed_batch(8)
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, sharding.shard_host_batch(batch, mesh), jax.random.key(1))
    losses.append(float(metrics['loss']))
  probs = train.make_window_probs_fn(model, config, mesh, shardings)(state.params, state.batch_stats, batch['x'])
  kernel = state.trainable['decoder']['block0_conv1']['conv']['kernel']
  head_state = state.opt_state.inner_states['head'].inner_state[0]
  moment = head_state.mu['decoder']['block0_conv1']['conv']['kernel']
  layout = {name: [list(leaf.sharding.spec), list(leaf.addressable_shards[0].data.shape)]
            for name, leaf in (('kernel', kernel), ('adam_mu', moment))}
  host = lambda tree: jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf), np.float64), tree)
  return dict(initial=initial, losses=losses, trainable=host(state.trainable), batch_stats=host(state.batch_stats),
              bank=host(state.bank.prototypes), probs=np.asarray(probs, np.float64), layout=layout,
              mesh=dict(mesh.shape))


def max_difference(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
  config = tiny_config()
  # eps 1e-3: Adam's first steps turn any gradient near 0 into +-lr, which would amplify reduction-order
  # noise into parameter differences; with a large eps the update stays proportional to the gradient.
  config.train.update(labelled_batch_size=8, unlabelled_batch_size=8, adam_eps=1e-3)
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
