"""Host-side read-ahead: `fn(item)` for a sequence of items on a thread pool, yielded in order.

Used wherever files are decoded for the device (predict, explanations, slide tiles): the reads of the next
`depth` items overlap the device work on the current ones, and memory holds at most `depth` results.
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar('Item')
Result = TypeVar('Result')


def prefetched(fn: Callable[[Item], Result], items: Iterable[Item], threads: int,
               depth: int = 8) -> Iterator[Result]:
  """`fn(item)` for every item, in order, computed by `threads` threads up to `depth` items ahead. An
  exception of `fn` is raised where its item would have been yielded; closing the iterator early cancels
  the reads not yet started."""
  with concurrent.futures.ThreadPoolExecutor(max(threads, 1), thread_name_prefix='prefetch') as pool:
    pending: collections.deque = collections.deque()
    try:
      for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= max(depth, 1):
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for future in pending:
        future.cancel()
