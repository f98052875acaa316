"""XLA flags for tests that simulate 8 CPU devices (set before JAX is imported, in their own process).

On a 2-core machine the 8 device threads of a collective can be starved for a long time (other test
processes, compilation); XLA's CPU runtime aborts a collective after 40 s by default, so the timeouts are
raised: a slow machine makes these tests slow, never a crash.

The persistent compilation cache (tests/conftest.py) is switched off here: on jax 0.10.2 a multi-device CPU
executable loaded from that cache deadlocks in its first all-reduce (seen with the MPAMatch sharding check:
8 threads wait forever, a fresh compile of the same program runs).
"""

import os

FLAGS = ('--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=1200 '
         '--xla_cpu_collective_call_terminate_timeout_seconds=1200')


def enable() -> None:
  """Call before JAX is imported."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + FLAGS).strip()
  os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)
