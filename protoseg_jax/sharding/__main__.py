"""`python -m protoseg_jax.sharding --config=... [--meshes=8x1x1,2x4x1]`: per-device memory of a config's
parameters and optimizer state under each mesh shape, and the layout of the last one (nothing allocated).

A program of its own (not part of the library in `__init__`): it builds the method and its train state,
which themselves import the sharding library.
"""

from typing import Sequence

import jax
from absl import app, flags
from ml_collections import config_flags

from protoseg_jax import logs, registry, sharding, train_state


def _define_flags() -> dict:
  cli = {
      'config': config_flags.DEFINE_config_file('config', None, 'Config file with get_config().'),
      'meshes': flags.DEFINE_list('meshes', ['1x1x1', '8x1x1', '1x8x1', '2x4x1', '2x1x4', '1x1x8'],
                                  'Mesh shapes DATAxFSDPxTENSOR, one table row each; the last is described.'),
  }
  flags.mark_flags_as_required(['config'])
  return cli


def main(argv: Sequence[str], cli: dict) -> None:
  del argv
  config = cli['config'].value
  method = registry.build(config)
  trainable, _ = method.split_params(method.abstract_variables(jax.random.key(0))[0])
  optimizer, _ = method.optimizer(trainable, 1)
  abstract_state = train_state.abstract_train_state(method, optimizer)
  rules = config.sharding.logical_rules
  shardings_for = lambda mesh: train_state.state_shardings(abstract_state, optimizer, method, mesh, rules)
  meshes = [tuple(int(n) for n in text.split('x')) for text in cli['meshes'].value]
  print(sharding.memory_table(abstract_state, shardings_for, meshes))
  print()
  mesh = sharding.abstract_mesh(meshes[-1])
  print(sharding.describe(abstract_state, shardings_for(mesh), mesh))


if __name__ == '__main__':
  logs.quiet_library_info()
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
