"""Library chatter kept out of the command-line programs' console and log files.

Two kinds of INFO records are dropped (warnings and errors always pass): Orbax's per-save messages, and
JAX's probing of platforms the machine does not have ("Unable to initialize backend 'tpu': ... libtpu.so"
on every CPU or GPU machine without `JAX_PLATFORMS` set). Install before the first JAX call.
"""

from __future__ import annotations

import logging as py_logging

from absl import logging

_PROBE_PREFIX = 'Unable to initialize backend'


def is_library_chatter(record: py_logging.LogRecord) -> bool:
  """True for an INFO/DEBUG record from Orbax or from JAX's platform probing."""
  if record.levelno >= py_logging.WARNING:
    return False
  if '/orbax/' in record.pathname:
    return True
  return record.pathname.endswith('xla_bridge.py') and record.getMessage().startswith(_PROBE_PREFIX)


class _DropLibraryChatter(py_logging.Filter):

  def filter(self, record: py_logging.LogRecord) -> bool:
    return not is_library_chatter(record)


def quiet_library_info() -> None:
  """Adds the filter to absl's handler (the one every program's records go through), once."""
  handler = logging.get_absl_handler()
  if not any(isinstance(existing, _DropLibraryChatter) for existing in handler.filters):
    handler.addFilter(_DropLibraryChatter())
