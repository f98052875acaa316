"""The shared config schema: every published config loads and passes the schema check; a wrong key, length or
method is one line naming it; which changes a resumed run accepts; the registry."""

import importlib.util
import os

import ml_collections
import pytest

from conftest import HERE
from protoseg_jax import config_base, registry
from protoseg_jax.errors import ConfigError
from protoseg_jax.method import Method

REPO = os.path.dirname(HERE)
CONFIGS = [('configs/bcss.py', None), ('configs/demo.py', None), ('configs/mpamatch_demo.py', None),
           ('configs/glas_semi.py', None), ('configs/glas_semi.py', 'ebhi_gland'),
           ('configs/glas_semi.py', 'ebhi_cancer'), ('configs/glas_semi.py', 'kpi'), ('tests/tiny_config.py', None)]


def load(path: str, argument=None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('config_under_test', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


@pytest.mark.parametrize('path, argument', CONFIGS)
def test_published_configs_match_their_method_schema(path, argument):
  config = load(path, argument)
  method = registry.get(config.method)
  config_base.check_config(config, method.default_config())
  for block in ('train', 'checkpoint', 'mesh', 'sharding', 'eval', 'predict', 'slides', 'logging'):
    assert block in config, block  # the shared schema
  assert config.data.mpp > 0 or argument in ('ebhi_gland', 'ebhi_cancer', 'kpi')  # unpublished: set by users


def test_unknown_key_and_lengths_are_named():
  schema = load('configs/demo.py')
  config = load('configs/demo.py')
  config.train.unlock()
  config.train.epoch = 3
  with pytest.raises(ConfigError, match=r'^unknown config key config\.train\.epoch \(did you mean '
                                        r'config\.train\.epochs\?\)$'):
    config_base.check_config(config, schema)
  for epochs, steps, message in ((0, 0, 'set exactly one of config.train.epochs'), (2, 5, 'set exactly one'),
                                 (-1, 0, r'config\.train\.epochs=-1 must be positive')):
    config = load('configs/demo.py')
    config.train.epochs, config.train.steps = epochs, steps
    with pytest.raises(ConfigError, match=message):
      config_base.check_config(config, schema)


def test_resume_accepts_paths_and_parallelism_but_not_the_run():
  saved = config_base.to_json_dict(load('configs/demo.py'))
  current = load('configs/demo.py')
  current.data.root = '/elsewhere'
  current.data.grain.read_threads = 16
  current.mesh.data = 8
  current.eval.batch_size = 64
  current.train.log_every_steps = 1
  assert config_base.run_defining_changes(saved, config_base.to_json_dict(current)) == []
  current.train.learning_rate = 1.0
  current.model.refiner_width = 64
  assert config_base.run_defining_changes(saved, config_base.to_json_dict(current)) == [
      'config.model.refiner_width: 32 -> 64', 'config.train.learning_rate: 0.005 -> 1.0']


def test_registry_finds_builtins_by_name_and_refuses_unknown_ones():
  assert {'dualprotoseg', 'mpamatch'} <= set(registry.built_in())
  assert registry.get('dualprotoseg').name == 'dualprotoseg'
  with pytest.raises(ConfigError, match=r"^config.method='segformer': no method package "
                                        r"protoseg_jax\.methods\.segformer \(built in: dualprotoseg, mpamatch\)$"):
    registry.get('segformer')
  with pytest.raises(ConfigError, match='is not a method name'):
    registry.get('two words')
  with pytest.raises(ConfigError, match=r'has no METHOD'):
    registry.get('protoseg_jax.errors')  # an importable module that is not a method package
  with pytest.raises(TypeError, match='is not a Method subclass'):
    registry.register('bad', dict)
  assert issubclass(registry.get('dualprotoseg'), Method)
