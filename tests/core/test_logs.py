"""`protoseg_jax.logs`: which library records the command-line programs drop (INFO only)."""

import logging

from protoseg_jax import logs


def record(pathname, level, message, *args):
  return logging.LogRecord('x', level, pathname, 1, message, args, None)


def test_platform_probe_and_orbax_info_are_dropped_warnings_kept():
  xla_bridge = '/venv/lib/python3.11/site-packages/jax/_src/xla_bridge.py'
  probe = ("Unable to initialize backend '%s': %s", 'tpu',
           'INTERNAL: Failed to open libtpu.so: libtpu.so: cannot open shared object file')
  assert logs.is_library_chatter(record(xla_bridge, logging.INFO, *probe))
  assert not logs.is_library_chatter(record(xla_bridge, logging.WARNING, *probe))
  assert not logs.is_library_chatter(record(xla_bridge, logging.INFO, 'Using backend %s', 'cpu'))
  orbax = '/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert logs.is_library_chatter(record(orbax, logging.INFO, 'Saving checkpoint at step %d', 4))
  assert not logs.is_library_chatter(record(orbax, logging.ERROR, 'could not save'))
  assert not logs.is_library_chatter(record('/work/protoseg_jax/trainer.py', logging.INFO, 'step 4'))


def test_filter_is_installed_once():
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  before = len(handler.filters)
  logs.quiet_library_info()
  logs.quiet_library_info()
  assert len(handler.filters) - before <= 1
  assert not handler.filter(record('/x/jax/_src/xla_bridge.py', logging.INFO,
                                   "Unable to initialize backend 'tpu': INTERNAL"))
