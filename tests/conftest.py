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


def tiny_mpamatch_config(data_root: str, num_val: int):
  """MPAMatch at test size on a synthetic set under `data_root`: 16 train tiles of 40 px (a quarter
  labelled), `num_val` val tiles, 32-px windows every 16 px, batches of 2 + 2, one-block towers."""
  sys.path.insert(0, os.path.dirname(HERE))
  from configs import mpamatch_demo  # pylint: disable=g-import-not-at-top
  config = mpamatch_demo.get_config()
  config.data.root = data_root
  config.data.synthetic.update(num_train=16, num_val=num_val, num_test=2, render_size=40)
  config.data.update(image_size=32, train_window=32, labelled_fraction=0.25)
  config.eval.update(stride=16, batch_size=4)
  config.model.vit.update(width=16, depth=1, num_heads=2, pos_embed_grid=4, taps=(0,))
  config.model.update(bottleneck_channels=8, decoder_channels=(4, 4, 4), embed_hidden=8, embed_dim=8)
  config.model.text.update(width=8, depth=1, embed_dim=8)
  config.train.update(log_every_steps=1, labelled_batch_size=2, unlabelled_batch_size=2)
  return config
