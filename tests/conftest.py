"""Shared test helpers, and a persistent XLA compilation cache for the whole suite.

Many tests build the same tiny programs in fresh processes or fresh closures (train / resume / CLI runs);
JAX's persistent cache (keyed by the HLO and the JAX version, so never stale) compiles each one once. Set
here, before JAX is imported, so subprocesses inherit it; an explicit JAX_COMPILATION_CACHE_DIR wins.
"""

import os
import sys
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'protoseg_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tiny_config as _tiny  # noqa: E402

TINY_CONFIG_PATH = os.path.join(HERE, 'tiny_config.py')


def tiny_config():
  return _tiny.get_config()
