"""Runs in its own process with 8 simulated CPU devices (tests/test_sharding.py starts it).

For each mesh (data, fsdp, tensor) it trains 3 steps on the same global batches as a 1-device run and
evaluates a small eval set, then prints one JSON object: losses, largest parameter differences, the
`.sharding.spec` and per-device shard shape of chosen arrays, collective counts, and confusion matrices.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import simulated_devices  # noqa: E402

simulated_devices.enable()  # before JAX is imported

import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import tiny_config  # noqa: E402
from protoseg_jax import evaluation, sharding, train_state  # noqa: E402
from protoseg_jax.method import EvalSet  # noqa: E402
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod  # noqa: E402

MESHES = ((8, 1, 1), (2, 4, 1), (2, 1, 4), (1, 8, 1))
EVAL_MESHES = ((8, 1, 1), (1, 8, 1), (2, 1, 4))
STEPS = 3
RTOL = 1e-5  # parameters are compared as |sharded - single| <= ATOL + RTOL * |single| (the parent test)

# Arrays whose layout the parent test checks, as (name, getter on a TrainState).
PROBES = {
    'trunk_qkv_kernel': lambda s: s.frozen['trunk']['blocks_0']['attn']['qkv']['kernel'],
    'trunk_proj_kernel': lambda s: s.frozen['trunk']['blocks_0']['attn']['proj']['kernel'],
    'trunk_fc1_kernel': lambda s: s.frozen['trunk']['blocks_0']['mlp']['fc1']['kernel'],
    'trunk_fc2_kernel': lambda s: s.frozen['trunk']['blocks_0']['mlp']['fc2']['kernel'],
    'trunk_norm1_scale': lambda s: s.frozen['trunk']['blocks_0']['norm1']['scale'],
    'text_token_embedding': lambda s: s.frozen['text_encoder']['token_embedding']['embedding'],
    'refiner_conv1_kernel': lambda s: s.trainable['shared_decoder']['block0_conv1']['kernel'],
    'refiner_conv1_mu': lambda s: s.opt_state[0].mu['shared_decoder']['block0_conv1']['kernel'],
    'refiner_conv1_nu': lambda s: s.opt_state[0].nu['shared_decoder']['block0_conv1']['kernel'],
    'pyramid3_conv2_kernel': lambda s: s.trainable['feature_pyramid_3']['conv2']['kernel'],
    'image_prototypes': lambda s: s.trainable['learnable_image_prototypes'],
    'adam_count': lambda s: s.opt_state[0].count,
    'step': lambda s: s.step,
}


def sharding_config():
  """The tiny test config with sizes that the mesh axes divide (heads 4, batch 8)."""
  config = tiny_config.get_config()
  config.model.vit.num_heads = 4
  config.model.text.num_heads = 4
  config.train.batch_size = 8
  config.eval.batch_size = 8
  config.train.learning_rate = 1e-3
  return config


def spec_list(spec):
  return [list(p) if isinstance(p, tuple) else p for p in spec]


def collectives(compiled_text: str) -> dict:
  """Collective ops in a compiled HLO module, by kind (`all-reduce(`, `all-reduce-start(`, ...)."""
  return {op: len(re.findall(rf'(?<![%.\w-]){op}(-start)?\(', compiled_text))
          for op in ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')}


def measured_device_bytes(tree) -> int:
  """Bytes that device 0 really holds for a tree of global arrays."""
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def main():
  assert jax.device_count() == 8, jax.devices()
  config = sharding_config()
  rules = config.sharding.logical_rules
  method = DualProtoSegMethod(config)
  params, extra = jax.device_get(method.init_variables(jax.random.key(0)))
  initial_trainable = method.split_params(params)[0]
  optimizer, schedules = method.optimizer(initial_trainable, 100)
  rng = np.random.default_rng(0)
  batches = [{'images': rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
              'labels': rng.integers(0, 2, (8, 4)).astype(np.int32), 'valid': np.ones(8, bool)}
             for _ in range(STEPS)]
  step_key = jax.random.key(1)

  # 1-device reference: the method's step, plainly jitted on one device.
  reference_step = jax.jit(method.train_step_fn(optimizer, schedules))
  state = train_state.create_train_state(jax.device_put(params, jax.devices()[0]),
                                         jax.device_put(extra, jax.devices()[0]), optimizer, method)
  reference_losses = []
  for batch in batches:
    state, metrics = reference_step(state, jax.device_put(batch, jax.devices()[0]), step_key)
    reference_losses.append(float(metrics['loss']))
  reference_trainable = jax.device_get(state.trainable)
  reference_opt = jax.device_get(state.opt_state)

  results = {'reference_losses': reference_losses, 'meshes': {}}
  for sizes in MESHES:
    start = time.perf_counter()
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, sizes)))
    state, shardings = train_state.create_sharded_train_state(params, extra, optimizer, method, mesh, rules)
    step = train_state.jit_train_step(method, optimizer, schedules, mesh, shardings, rules)
    losses = []
    first_batch = sharding.shard_host_batch(batches[0], mesh, host_rows=True)
    compiled = step.lower(state, first_batch, step_key).compile()  # compiled once, used for the steps
    for batch in batches:
      state, metrics = compiled(state, sharding.shard_host_batch(batch, mesh, host_rows=True), step_key)
      losses.append(float(metrics['loss']))
    trainable = jax.device_get(state.trainable)
    updated = max(float(np.max(np.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(trainable), jax.tree.leaves(initial_trainable)))
    excess = max(float(np.max(np.abs(a - b) - RTOL * np.abs(b))) for a, b in
                 zip(jax.tree.leaves(trainable), jax.tree.leaves(reference_trainable)))
    param_diff = max(float(np.max(np.abs(a - b))) for a, b in
                     zip(jax.tree.leaves(trainable), jax.tree.leaves(reference_trainable)))
    param_scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(reference_trainable))
    relative = max(float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3))) for a, b in
                   zip(jax.tree.leaves(trainable), jax.tree.leaves(reference_trainable)))
    opt_diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                   for a, b in zip(jax.tree.leaves(jax.device_get(state.opt_state)),
                                   jax.tree.leaves(reference_opt)))
    probes = {}
    for name, get in PROBES.items():
      array = get(state)
      probes[name] = {'spec': spec_list(array.sharding.spec), 'shape': list(array.shape),
                      'shard_shape': list(array.addressable_shards[0].data.shape),
                      'declared': spec_list(get(shardings).spec)}
    results['meshes'][str(sizes)] = {
        'losses': losses, 'max_update': updated, 'max_param_excess': excess, 'max_param_diff': param_diff,
        'max_param': param_scale,
        'max_param_rel_diff': relative, 'max_opt_state_diff': opt_diff, 'probes': probes,
        'batch_spec': spec_list(first_batch['images'].sharding.spec),
        'batch_shard_rows': first_batch['images'].addressable_shards[0].data.shape[0],
        'collectives': collectives(compiled.as_text()),
        'memory': sharding.describe(state, shardings, mesh).splitlines()[-1],
        'seconds': time.perf_counter() - start,
        'computed_bytes': [sharding.per_device_bytes(getattr(state, field), getattr(shardings, field))
                           for field in ('trainable', 'frozen', 'opt_state')],
        'measured_bytes': [measured_device_bytes(getattr(state, field))
                           for field in ('trainable', 'frozen', 'opt_state')]}

  # Evaluation: 13 tiles -> two batches of 8, the second padded; same confusion matrix on any mesh.
  count, size = 13, config.data.image_size
  eval_set = EvalSet(names=[f'tile{i}.png' for i in range(count)],
                     images=list(rng.integers(0, 256, (count, size, size, 3), np.uint8)),
                     masks=list(rng.integers(0, 5, (count, size, size)).astype(np.uint8)),
                     labels=rng.integers(0, 2, (count, 4)).astype(np.int32), num_examples=count)

  def evaluate(mesh):
    shardings = sharding.param_shardings(params, mesh, rules, method.param_axes())
    extra_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), extra)
    evaluator = evaluation.Evaluator(method, config, mesh, shardings, extra_shardings)
    placed, placed_extra = sharding.place_tree(params, shardings), sharding.place_tree(extra, extra_shardings)
    return evaluator.evaluate(placed, placed_extra, eval_set)

  single = evaluate(sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1]))
  results['eval'] = {'single': single['confusion_matrix'], 'single_mIoU': single['mIoU']}
  start = time.perf_counter()
  for sizes in EVAL_MESHES:
    sharded = evaluate(sharding.make_mesh(dict(zip(sharding.MESH_AXES, sizes))))
    results['eval'][str(sizes)] = {'confusion': sharded['confusion_matrix'], 'mIoU': sharded['mIoU'],
                                   'metrics_equal': {k: v for k, v in sharded.items()
                                                     if k != 'confusion_matrix'} ==
                                   {k: v for k, v in single.items() if k != 'confusion_matrix'}}
  results['eval_seconds'] = time.perf_counter() - start
  print('RESULT ' + json.dumps(results))


if __name__ == '__main__':
  main()
