"""Config file of the tests-only toy method: loading it registers the method (`config.method = 'toy'`), as a
third-party method package would; `python -m protoseg_jax.main --config=tests/toy_config.py ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import toy_method  # noqa: E402

toy_method.register()


def get_config():
  return toy_method.get_config()
