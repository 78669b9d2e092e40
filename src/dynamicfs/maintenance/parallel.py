"""Running per-extent maintenance work on a few threads, results in submission order.

Rebuilding an extent waits on disk reads and writes most of the time, so a drain or a
repair pass keeps a few extents in flight at once (the engine's rebuild is safe to run
concurrently: a rebuild made void by another change records nothing).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

_I = TypeVar("_I")
_T = TypeVar("_T")


def in_order(workers: ThreadPoolExecutor, items: Iterable[_I], fn: Callable[[_I], _T],
             window: int) -> Iterator[tuple[_I, _T]]:
    """fn(item) for each item on the workers, at most `window` in flight, in order.

    `items` is consumed lazily: a caller can stop submitting (e.g. on a stop request)
    by ending the iterable."""
    pending: collections.deque[tuple[_I, Future[_T]]] = collections.deque()
    for item in items:
        pending.append((item, workers.submit(fn, item)))
        if len(pending) >= window:
            first, fut = pending.popleft()
            yield first, fut.result()
    while pending:
        first, fut = pending.popleft()
        yield first, fut.result()
