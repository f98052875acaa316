"""Mesh sharding: rules and layouts (device-free meshes, in process) and, on 8 simulated CPU devices in a
subprocess (tests/sharding_check.py), 3 sharded train steps and evaluation against the 1-device run."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import HERE, tiny_config
from protoseg_jax import sharding, train_state
from protoseg_jax.methods.dualprotoseg.method import HEAD_PARAM_AXES, DualProtoSegMethod

REPO = os.path.dirname(HERE)
RULES = sharding.default_rules()
MESHES = ('(8, 1, 1)', '(2, 4, 1)', '(2, 1, 4)', '(1, 8, 1)')
LOSS_RTOL, PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-5, 1e-6


class Abstract:
  """A method's TrainState as shapes only (never materialised), with its optimizer."""

  def __init__(self, config):
    self.method = DualProtoSegMethod(config)
    trainable, _ = self.method.split_params(self.method.abstract_variables(jax.random.key(0))[0])
    self.optimizer, _ = self.method.optimizer(trainable, 10)
    self.state = train_state.abstract_train_state(self.method, self.optimizer)

  def shardings(self, mesh):
    return sharding.train_state_shardings(self.state, self.optimizer, mesh, RULES, self.method.param_axes())


def full_config():
  """The published setting; the built-in byte tokenizer stands in for CONCH's tokenizer.json (the shapes
  depend on config.model only)."""
  config = DualProtoSegMethod.default_config()
  config.tokenizer.kind = 'bytes'
  return config


@pytest.fixture(scope='module')
def full():
  return Abstract(full_config())


@pytest.fixture(scope='module')
def tiny():
  return Abstract(tiny_config())


# --- rules, in process ----------------------------------------------------------------------------------

def test_every_parameter_of_the_full_and_tiny_models_has_logical_axes(full, tiny):
  for abstract in (full, tiny):
    params = abstract.state.params
    axes = sharding.param_logical_axes(params, abstract.method.param_axes())
    flat_axes = jax.tree.structure(params).flatten_up_to(axes)
    assert all(len(a) == leaf.ndim for a, leaf in zip(flat_axes, jax.tree.leaves(params)))
  with pytest.raises(ValueError, match=r'shared_decoder/block0_conv1/kernel \(shape .*\) matches no pattern'):
    sharding.param_logical_axes(full.state.params)  # the heads' names come from the method's table
  axes = sharding.param_logical_axes(full.state.params, full.method.param_axes())
  assert axes['trunk']['blocks_3']['attn']['qkv']['kernel'] == ('embed', 'qkv')
  assert axes['text_encoder']['resblocks_0']['c_proj']['kernel'] == ('mlp', 'embed')
  assert axes['shared_decoder']['block0_conv1']['kernel'] == (None, None, 'conv_in', 'conv_out')
  assert axes['shared_decoder']['block0_norm1']['scale'] == ('vector',)


def test_unclassified_or_misshapen_parameter_is_named():
  with pytest.raises(ValueError, match=r'new_head/kernel \(shape \(3, 4\)\) matches no pattern'):
    sharding.param_logical_axes({'new_head': {'kernel': jnp.zeros((3, 4))}, 'logit_scale1': jnp.zeros(())},
                                HEAD_PARAM_AXES)
  with pytest.raises(ValueError, match=r'trunk/blocks_0/attn/qkv/kernel has shape \(2, 3, 4\)'):
    sharding.param_logical_axes({'trunk': {'blocks_0': {'attn': {'qkv': {'kernel': jnp.zeros((2, 3, 4))}}}}},
                                HEAD_PARAM_AXES)


def test_logical_to_spec_priority_divisibility_and_size_one_axes():
  mesh = sharding.abstract_mesh((2, 4, 2))
  # tensor takes the qkv side, fsdp the embed side
  assert sharding.logical_to_spec(('embed', 'qkv'), (768, 2304), mesh, RULES)[0] == P('fsdp', 'tensor')
  # batch over both data axes; other dims replicated
  assert sharding.logical_to_spec(('batch', 'length', 'act_embed'), (8, 197, 768), mesh, RULES)[0] == \
      P(('data', 'fsdp'))
  # not divisible: replicated, with a note naming the sizes
  spec, notes = sharding.logical_to_spec((None, None, 'conv_in', 'conv_out'), (3, 3, 6, 4), mesh, RULES)
  assert spec == P(None, None, None, 'tensor')
  assert notes == ['conv_in (6) not divisible by fsdp (4): replicated']
  # an axis is used once per array: the 'embed' -> tensor fallback only applies when tensor is free
  assert sharding.logical_to_spec(('vocab', 'embed'), (32007, 768), sharding.abstract_mesh((1, 1, 8)),
                                  RULES)[0] == P(None, 'tensor')
  assert sharding.logical_to_spec(('heads', 'embed'), (768, 768), sharding.abstract_mesh((1, 1, 8)),
                                  RULES)[0] == P('tensor')
  # size-1 axes are dropped: pure data parallelism replicates every parameter
  assert sharding.logical_to_spec(('embed', 'mlp'), (768, 3072), sharding.abstract_mesh((8, 1, 1)),
                                  RULES)[0] == P()


def test_bad_rules_and_mesh_config_name_the_config_key():
  with pytest.raises(ValueError, match=r"config.sharding.logical_rules: 'embed' -> 'model' names unknown"):
    sharding.check_rules((('embed', 'model'),))
  with pytest.raises(ValueError, match='config.mesh'):
    sharding.mesh_shape({'data': 2, 'fsdp': 2}, 8)
  with pytest.raises(ValueError, match='config.mesh'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(ValueError, match=r"unknown config.mesh axis\(es\) \['model'\]"):
    sharding.mesh_shape({'model': 2}, 8)
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2, 'tensor': 2}, 16) == {'data': 4, 'fsdp': 2, 'tensor': 2}
  with pytest.raises(ValueError, match='config.mesh'):
    sharding.make_mesh({'data': 2})  # one CPU device in this process
  mesh = sharding.make_mesh(DualProtoSegMethod.default_config().mesh)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}


def test_global_batch_must_divide_data_parallel_size():
  mesh = sharding.abstract_mesh((2, 4, 1))
  sharding.check_global_batch(16, mesh)
  with pytest.raises(ValueError, match=r'config.train.batch_size=12 is not divisible by the data-parallel '
                                       r'size 8 \(config.mesh data=2 x fsdp=4\)'):
    sharding.check_global_batch(12, mesh)
  with pytest.raises(ValueError, match='config.eval.batch_size=6'):
    sharding.check_global_batch(6, mesh, 'config.eval.batch_size')


def test_state_shardings_optimizer_moments_follow_their_parameters(tiny):
  state = tiny.state
  shardings = tiny.shardings(sharding.abstract_mesh((1, 2, 4)))
  assert shardings == train_state.state_shardings(state, tiny.optimizer, tiny.method,
                                                  sharding.abstract_mesh((1, 2, 4)), RULES)
  adam = shardings.opt_state[0]
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.trainable)
  for moments in (adam.mu, adam.nu):
    assert jax.tree.leaves(moments) == jax.tree.leaves(shardings.trainable)
  assert adam.count.spec == P() and shardings.step.spec == P()
  conv = shardings.trainable['shared_decoder']['block0_conv1']['kernel']
  assert conv.spec == P(None, None, 'fsdp', 'tensor')
  assert shardings.frozen['trunk']['blocks_0']['mlp']['fc2']['kernel'].spec == P('tensor', 'fsdp')


def test_per_device_bytes_is_shard_arithmetic():
  mesh = sharding.abstract_mesh((1, 8, 1))
  tree = {'a': jax.ShapeDtypeStruct((16, 8), jnp.float32), 'b': jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
  shardings = {'a': NamedSharding(mesh, P('fsdp')), 'b': NamedSharding(mesh, P())}
  assert sharding.per_device_bytes(tree, shardings) == 2 * 8 * 4 + 3 * 2


def test_full_size_memory_per_device(full):
  """Per-device bytes at full size: pure data parallelism replicates, FSDP / tensor divide (~8x)."""
  full_state = full.state
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  trainable, frozen = count(full_state.trainable), count(full_state.frozen)
  values = {}
  all_sizes = ((1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 1, 4), (1, 1, 8))
  for sizes in all_sizes:
    mesh = sharding.abstract_mesh(sizes)
    shardings = full.shardings(mesh)
    values[sizes] = [sharding.per_device_bytes(getattr(full_state, f), getattr(shardings, f))
                     for f in ('trainable', 'frozen', 'opt_state')]
  assert values[(1, 1, 1)][:2] == [4 * trainable, 4 * frozen]
  assert values[(1, 1, 1)][2] == 2 * 4 * trainable + 4 * 2  # Adam mu, nu (+ int32 counts)
  assert values[(8, 1, 1)] == values[(1, 1, 1)]
  for sizes, divisor in (((1, 8, 1), 8), ((2, 4, 1), 4), ((2, 1, 4), 4), ((1, 1, 8), 8)):
    for sharded, whole in zip(values[sizes], values[(1, 1, 1)]):
      assert whole / divisor <= sharded < 1.2 * whole / divisor, (sizes, sharded, whole)
  qkv = full_state.frozen['trunk']['blocks_0']['attn']['qkv']['kernel']
  spec = full.shardings(sharding.abstract_mesh((1, 8, 1))).frozen
  assert spec['trunk']['blocks_0']['attn']['qkv']['kernel'].shard_shape(qkv.shape) == (96, 2304)
  # The table of `python -m protoseg_jax.sharding` prints these numbers, one row per mesh.
  rows = sharding.memory_table(full_state, full.shardings, all_sizes).splitlines()[2:]
  assert len(rows) == len(all_sizes)
  for sizes, row in zip(all_sizes, rows):
    assert row.startswith(str(sizes))
    expected = values[sizes] + [sum(values[sizes])]
    assert re.findall(r'([\d,]+\.\d\d) MiB', row) == [f'{v / 2 ** 20:,.2f}' for v in expected], row


def test_describe_lists_mesh_groups_and_memory(tiny):
  mesh = sharding.abstract_mesh((2, 1, 4))
  text = sharding.describe(tiny.state, tiny.shardings(mesh), mesh)
  lines = text.splitlines()
  assert lines[0].startswith("mesh {'data': 2, 'fsdp': 1, 'tensor': 4} (8 devices)")
  trunk = next(line for line in lines if line.startswith('trunk '))
  assert 'frozen' in trunk and "P(None, 'tensor')" in trunk and "P('tensor')" in trunk
  assert lines[-1].startswith('per device: trainable params') and 'optimizer state' in lines[-1]


def test_single_device_batch_rows_placement_and_host_copy():
  mesh = sharding.make_mesh({'data': -1})
  assert sharding.process_batch_rows(8, mesh) == slice(0, 8)
  batch = {'images': np.arange(8 * 2).reshape(8, 2).astype(np.uint8), 'valid': np.ones(8, bool)}
  placed = sharding.shard_host_batch(batch, mesh)
  assert placed['images'].sharding.spec == P(('data', 'fsdp')) and placed['valid'].dtype == bool
  tree = {'a': np.arange(6.0).reshape(2, 3)}
  shardings = {'a': NamedSharding(mesh, P('fsdp'))}
  copied = sharding.host_copy(sharding.place_tree(tree, shardings))
  assert isinstance(copied['a'], np.ndarray)
  np.testing.assert_array_equal(copied['a'], tree['a'])
  np.testing.assert_array_equal(sharding.host_copy(placed)['images'], batch['images'])
  # A host's own rows (global rows = rows x process count: here 1 process) and back.
  host_rows = sharding.shard_host_batch(batch, mesh, host_rows=True)
  assert host_rows['images'].shape == (8, 2)
  np.testing.assert_array_equal(sharding.local_rows(host_rows['images']), batch['images'])


def test_activation_constraint_is_a_no_op_without_a_mesh_context():
  x = jnp.ones((4, 3, 8))
  assert sharding.with_logical_constraint(x, ('batch', 'length', 'act_embed')) is x


def test_memory_table_cli_runs_on_the_tiny_config():
  result = subprocess.run([sys.executable, '-m', 'protoseg_jax.sharding',
                           f'--config={os.path.join(HERE, "tiny_config.py")}', '--meshes=1x1x1,2x1x4'],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr
  assert '(2, 1, 4)' in result.stdout and "mesh {'data': 2, 'fsdp': 1, 'tensor': 4}" in result.stdout


def test_initialize_distributed_modes(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  config = DualProtoSegMethod.default_config()
  assert not sharding.initialize_distributed(config, environ={})
  single_host = {'SLURM_NTASKS': '1', 'TPU_WORKER_HOSTNAMES': 'a'}
  assert not sharding.initialize_distributed(config, environ=single_host)
  config.sharding.distributed = 'off'
  assert not sharding.initialize_distributed(config, environ={'JAX_COORDINATOR_ADDRESS': 'h:1'})
  assert calls == []
  config.sharding.distributed = 'auto'
  assert sharding.initialize_distributed(config, environ={'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'})
  config.sharding.update(distributed='on', coordinator_address='h0:1234', num_processes=4, process_id=2)
  assert sharding.initialize_distributed(config, environ={})
  assert calls == [{}, {'coordinator_address': 'h0:1234', 'num_processes': 4, 'process_id': 2}]
  config.sharding.distributed = 'yes'
  with pytest.raises(ValueError, match='config.sharding.distributed'):
    sharding.initialize_distributed(config, environ={})


# --- 8 simulated devices, in a subprocess ----------------------------------------------------------------

@pytest.fixture(scope='module')
def eight_devices():
  environ = dict(os.environ, JAX_PLATFORMS='cpu')  # the script sets the 8-device XLA flags
  result = subprocess.run([sys.executable, os.path.join(HERE, 'sharding_check.py')], capture_output=True,
                          text=True, cwd=REPO, env=environ, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  line = next(line for line in result.stdout.splitlines() if line.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES)
def test_three_sharded_steps_equal_the_one_device_run(eight_devices, mesh):
  result = eight_devices['meshes'][mesh]
  np.testing.assert_allclose(result['losses'], eight_devices['reference_losses'], rtol=LOSS_RTOL)
  # |sharded - single| <= ATOL + RTOL * |single| for every trainable value after 3 steps, and the
  # parameters really moved (by far more than the tolerance).
  assert result['max_param_excess'] <= PARAM_ATOL, result
  assert result['max_update'] > 100 * PARAM_ATOL, result
  assert result['max_opt_state_diff'] <= 1e-5, result
  data, fsdp, _ = json.loads(mesh.replace('(', '[').replace(')', ']'))
  assert result['batch_spec'] == [['data', 'fsdp']] and result['batch_shard_rows'] == 8 // (data * fsdp)
  # the describe / memory-table arithmetic equals what device 0 really holds
  assert result['computed_bytes'] == result['measured_bytes']


# mesh -> {probe: (spec, per-device shard shape)}; tiny sizes: ViT width 32 (4 heads, MLP 128), text width 16,
# refiner 16 channels, pyramid (8, 8, 4, 4), prototype space 16, 8 prototypes.
EXPECTED_LAYOUT = {
    '(8, 1, 1)': {name: ([], None) for name in ('trunk_qkv_kernel', 'trunk_fc1_kernel',
                                                'refiner_conv1_kernel', 'refiner_conv1_mu',
                                                'text_token_embedding')},
    '(2, 4, 1)': {'trunk_qkv_kernel': (['fsdp'], [8, 96]),
                  'trunk_proj_kernel': ([None, 'fsdp'], [32, 8]),
                  'trunk_fc1_kernel': (['fsdp'], [8, 128]),
                  'trunk_fc2_kernel': ([None, 'fsdp'], [128, 8]),
                  'trunk_norm1_scale': ([], [32]),
                  'text_token_embedding': ([None, 'fsdp'], [259, 4]),
                  'refiner_conv1_kernel': ([None, None, 'fsdp'], [3, 3, 4, 16]),
                  'refiner_conv1_mu': ([None, None, 'fsdp'], [3, 3, 4, 16]),
                  'refiner_conv1_nu': ([None, None, 'fsdp'], [3, 3, 4, 16]),
                  'pyramid3_conv2_kernel': ([None, None, 'fsdp'], [3, 3, 1, 4]),
                  'image_prototypes': ([None, 'fsdp'], [8, 4]),
                  'adam_count': ([], [])},
    '(2, 1, 4)': {'trunk_qkv_kernel': ([None, 'tensor'], [32, 24]),
                  'trunk_proj_kernel': (['tensor'], [8, 32]),
                  'trunk_fc1_kernel': ([None, 'tensor'], [32, 32]),
                  'trunk_fc2_kernel': (['tensor'], [32, 32]),
                  'text_token_embedding': ([None, 'tensor'], [259, 4]),
                  'refiner_conv1_kernel': ([None, None, None, 'tensor'], [3, 3, 16, 4]),
                  'refiner_conv1_mu': ([None, None, None, 'tensor'], [3, 3, 16, 4]),
                  'pyramid3_conv2_kernel': ([None, None, None, 'tensor'], [3, 3, 4, 1]),
                  'image_prototypes': ([], [8, 16])},
    '(1, 8, 1)': {'trunk_qkv_kernel': (['fsdp'], [4, 96]),
                  'trunk_fc2_kernel': ([None, 'fsdp'], [128, 4]),
                  'refiner_conv1_kernel': ([None, None, 'fsdp'], [3, 3, 2, 16]),
                  'refiner_conv1_nu': ([None, None, 'fsdp'], [3, 3, 2, 16]),
                  # 4 input channels do not split 8 ways: replicated
                  'pyramid3_conv2_kernel': ([], [3, 3, 4, 4]),
                  'image_prototypes': ([None, 'fsdp'], [8, 2]),
                  'step': ([], [])},
}


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES)
def test_parameters_are_laid_out_as_the_rules_say(eight_devices, mesh):
  probes = eight_devices['meshes'][mesh]['probes']
  for name, (spec, shard_shape) in EXPECTED_LAYOUT[mesh].items():
    probe = probes[name]
    assert probe['spec'] == spec and probe['declared'] == spec, (name, probe)
    assert probe['shard_shape'] == (probe['shape'] if shard_shape is None else shard_shape), (name, probe)


@pytest.mark.slow
def test_eval_metrics_identical_on_one_and_eight_devices(eight_devices):
  evaluation = eight_devices['eval']
  assert np.sum(evaluation['single']) == 13 * 32 * 32  # padded samples are not counted
  for mesh in ('(8, 1, 1)', '(1, 8, 1)', '(2, 1, 4)'):
    assert evaluation[mesh]['confusion'] == evaluation['single'], mesh
    assert evaluation[mesh]['metrics_equal'], mesh
