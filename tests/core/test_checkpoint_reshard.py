"""A checkpoint saved under one device mesh restores onto another (8 simulated CPU devices, own process)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import HERE
from simulated_devices import FLAGS

SCRIPT = textwrap.dedent('''
    import json, os, sys
    os.environ['XLA_FLAGS'] = sys.argv[2]
    os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)  # see tests/simulated_devices.py
    import jax, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from protoseg_jax import checkpoints, sharding, trainer
    from protoseg_jax.method import TrainState

    directory = sys.argv[1]
    kernel = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    adam, decay = optax.adam(1e-3).init({'kernel': kernel})
    values = TrainState(
        step=np.int32(7), trainable={'kernel': kernel}, frozen={'tower': np.ones((4, 4), np.float32)},
        extra={'bank': np.linspace(0, 1, 32, dtype=np.float32).reshape(8, 4)},
        opt_state=(adam._replace(count=np.int32(7), mu={'kernel': kernel / 2}, nu={'kernel': kernel ** 2}),
                   decay),
        nonfinite_step=np.int32(-1))

    def layout(mesh, kernel_spec, bank_spec):
      kernel_sharding = {'kernel': NamedSharding(mesh, kernel_spec)}
      whole = NamedSharding(mesh, P())
      return TrainState(step=whole, trainable=kernel_sharding, frozen={'tower': whole},
                        extra={'bank': NamedSharding(mesh, bank_spec)},
                        opt_state=(adam._replace(count=whole, mu=kernel_sharding, nu=kernel_sharding), decay),
                        nonfinite_step=whole)

    fsdp = sharding.make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1})
    state = jax.tree.map(jax.device_put, values, layout(fsdp, P('fsdp', None), P('fsdp')))
    saved = trainer.resumable(state)
    manager = checkpoints.TrainCheckpoints(directory, keep=1, async_save=False)
    manager.save(7, saved, {'step': 7}, {'step': 7})
    manager.wait()

    tensor = sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})
    zeros = jax.tree.map(np.zeros_like, values)
    target = jax.tree.map(jax.device_put, zeros, layout(tensor, P(None, 'tensor'), P('data', 'tensor')))
    restored, data, meta = manager.restore(7, trainer.resumable(target))
    state = target.replace(**restored)  # as the trainer resumes
    name = lambda path: jax.tree_util.keystr(path, simple=True, separator='/')
    flat = jax.tree_util.tree_flatten_with_path(trainer.resumable(state))[0]
    report = {
        'saved_keys': sorted(saved),
        'equal': {name(path): bool(np.array_equal(np.asarray(leaf), want)) for (path, leaf), want in
                  zip(flat, jax.tree.leaves(trainer.resumable(values)))},
        'specs': {name(path): list(leaf.sharding.spec) for path, leaf in flat},
        'meshes': [dict(leaf.sharding.mesh.shape) for _, leaf in flat],
        'shard_shapes': {name(path): list(leaf.addressable_shards[0].data.shape) for path, leaf in flat},
        'data': data, 'meta': meta}
    print('RESULT ' + json.dumps(report))
''')


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
  root = os.path.dirname(HERE)
  environment = {**os.environ, 'PYTHONPATH': root, 'JAX_PLATFORMS': 'cpu'}
  completed = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path), FLAGS], capture_output=True,
                             text=True, env=environment, timeout=600, check=False)
  lines = [line for line in completed.stdout.splitlines() if line.startswith('RESULT ')]
  assert completed.returncode == 0 and lines, completed.stderr[-3000:]
  report = json.loads(lines[-1][len('RESULT '):])
  assert report['saved_keys'] == ['extra', 'opt_state', 'step', 'trainable']  # the frozen towers: not saved
  assert report['equal'] and all(report['equal'].values()), report['equal']
  # Saved under fsdp=8 as P('fsdp', None) / P('fsdp'); restored in the target's layout on (2, 1, 4).
  assert report['specs'] == {
      'step': [], 'trainable/kernel': [None, 'tensor'], 'extra/bank': ['data', 'tensor'],
      'opt_state/0/count': [], 'opt_state/0/mu/kernel': [None, 'tensor'],
      'opt_state/0/nu/kernel': [None, 'tensor']}
  assert all(mesh == {'data': 2, 'fsdp': 1, 'tensor': 4} for mesh in report['meshes'])
  shapes = report['shard_shapes']
  assert shapes['trainable/kernel'] == shapes['opt_state/0/mu/kernel'] == [8, 4]  # columns split 4 ways
  assert shapes['extra/bank'] == [4, 1]
  assert report['data'] == {'step': 7} and report['meta'] == {'step': 7}
