"""A checkpoint saved under one device mesh restores onto another (8 simulated CPU devices, own process)."""

import json
import os
import subprocess
import sys
import textwrap

from simulated_devices import FLAGS

SCRIPT = textwrap.dedent('''
    import json, os, sys
    os.environ['XLA_FLAGS'] = sys.argv[2]
    os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)  # see tests/simulated_devices.py
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from protoseg_jax import checkpoints, sharding

    directory = sys.argv[1]
    values = {'kernel': np.arange(8 * 16, dtype=np.float32).reshape(8, 16),
              'moments': (np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8),),
              'step': np.int32(7)}
    fsdp = sharding.make_mesh({'data': 1, 'fsdp': 8, 'tensor': 1})
    saved_layout = {'kernel': NamedSharding(fsdp, P('fsdp', None)),
                    'moments': (NamedSharding(fsdp, P(None, 'fsdp')),),
                    'step': NamedSharding(fsdp, P())}
    state = jax.tree.map(lambda v, s: jax.device_put(v, s), values, saved_layout)
    manager = checkpoints.TrainCheckpoints(directory, keep=1, async_save=False)
    manager.save(7, state, {'step': 7}, {'step': 7})
    manager.wait()

    tensor = sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})
    new_layout = {'kernel': NamedSharding(tensor, P(None, 'tensor')),
                  'moments': (NamedSharding(tensor, P('data', 'tensor')),),
                  'step': NamedSharding(tensor, P())}
    target = jax.tree.map(lambda v, s: jax.device_put(np.zeros_like(v), s), values, new_layout)
    restored, data, meta = manager.restore(7, target)
    report = {
        'equal': all(np.array_equal(np.asarray(r), v) for r, v in
                     zip(jax.tree.leaves(restored), jax.tree.leaves(values))),
        'specs': [list(leaf.sharding.spec) for leaf in jax.tree.leaves(restored)],
        'meshes': [dict(leaf.sharding.mesh.shape) for leaf in jax.tree.leaves(restored)],
        'shard_shape': list(restored['kernel'].addressable_shards[0].data.shape),
        'data': data}
    print('RESULT ' + json.dumps(report))
''')


def test_restore_onto_a_different_mesh(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  environment = {**os.environ, 'PYTHONPATH': root, 'JAX_PLATFORMS': 'cpu'}
  completed = subprocess.run([sys.executable, '-c', SCRIPT, str(tmp_path), FLAGS], capture_output=True,
                             text=True, env=environment, timeout=600, check=False)
  lines = [line for line in completed.stdout.splitlines() if line.startswith('RESULT ')]
  assert completed.returncode == 0 and lines, completed.stderr[-3000:]
  report = json.loads(lines[-1][len('RESULT '):])
  assert report['equal']
  # Leaves in tree order: kernel, moments[0], step.
  assert report['specs'] == [[None, 'tensor'], ['data', 'tensor'], []]
  assert all(mesh == {'data': 2, 'fsdp': 1, 'tensor': 4} for mesh in report['meshes'])
  assert report['shard_shape'] == [8, 4]  # the kernel's columns split 4 ways, as the new layout says
  assert report['data'] == {'step': 7}
