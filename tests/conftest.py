"""Shared test helpers."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tiny_config as _tiny  # noqa: E402

TINY_CONFIG_PATH = os.path.join(HERE, 'tiny_config.py')


def tiny_config():
  return _tiny.get_config()
