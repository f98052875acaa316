"""`prefetch.prefetched`: order, read-ahead depth, errors at their item, early close."""

import threading
import time

import pytest

from protoseg_jax import prefetch


def test_results_come_in_order_whatever_finishes_first():
  delays = [0.03, 0.0, 0.02, 0.0, 0.01]
  def slow(index):
    time.sleep(delays[index])
    return index * 10
  assert list(prefetch.prefetched(slow, range(5), threads=4, depth=3)) == [0, 10, 20, 30, 40]


def test_no_more_than_depth_items_are_read_ahead():
  started = []
  lock = threading.Lock()
  def record(index):
    with lock:
      started.append(index)
    return index
  stream = prefetch.prefetched(record, range(100), threads=2, depth=4)
  assert next(stream) == 0
  time.sleep(0.05)
  assert len(started) <= 4 + 1      # the depth in flight, plus the one submitted before the first yield
  stream.close()


def test_an_error_is_raised_at_its_item():
  def fail_on_two(index):
    if index == 2:
      raise ValueError('bad item 2')
    return index
  stream = prefetch.prefetched(fail_on_two, range(5), threads=2, depth=2)
  assert [next(stream), next(stream)] == [0, 1]
  with pytest.raises(ValueError, match='^bad item 2$'):
    next(stream)


def test_closing_early_cancels_the_reads_not_started():
  release = threading.Event()
  calls = []
  def blocked(index):
    calls.append(index)
    if index > 0:
      release.wait(5)
    return index
  stream = prefetch.prefetched(blocked, range(50), threads=1, depth=10)
  assert next(stream) == 0          # 10 submitted; item 1 now runs on the one thread and blocks
  threading.Timer(0.1, release.set).start()
  stream.close()                    # cancels items 2..9, then waits for item 1
  assert calls == [0, 1]
