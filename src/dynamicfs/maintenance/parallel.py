"""Running per-extent maintenance work on a few threads, results in submission order.

Rebuilding an extent waits on disk reads and writes most of the time, so a drain or a
repair pass keeps a few extents in flight at once (the engine's rebuild is safe to run
concurrently: a rebuild made void by another change records nothing).

`rebuild_in_batches` is how a repair pass and a drain rebuild many extents: the calling
thread loads the extents' metadata LOAD_BATCH at a time (ExtentStore.load_many), the
workers do the disk work (ExtentStore.prepare_rebuild: read, re-create, write; no
metadata lock), and the calling thread records the results RECORD_BATCH at a time
under one lock (record_rebuilt), where the caller settles each extent's fate. Two lock
round trips per extent on every worker kept them waiting a quarter of the time.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from sqlite3 import Connection
from typing import TYPE_CHECKING, TypeVar

from dynamicfs.engine.store import ExtentInfo, RebuiltExtent
from dynamicfs.errors import DynamicFSError

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool

_I = TypeVar("_I")
_T = TypeVar("_T")

LOAD_BATCH = 64  # extents whose metadata is loaded under one lock
RECORD_BATCH = 16  # rebuilt extents recorded under one lock

# What became of one extent's rebuild: an outcome of ExtentStore.rebuild ('gone' when the
# extent no longer exists), or the error that stopped it.
Outcome = str | DynamicFSError | OSError


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


def rebuild_in_batches(
        pool: Pool, items: Iterable[_I], extent_of: Callable[[_I], int],
        prepare: Callable[[_I, ExtentInfo], RebuiltExtent | str],
        settle: Callable[[Connection, _I, ExtentInfo | None, Outcome], _T],
        *, threads: int, name: str,
) -> Iterator[list[tuple[_I, _T]]]:
    """Rebuild the extents of `items` (in order; consumed lazily, so ending the iterable
    stops the work): `prepare(item, info)` on `threads` workers, then, for each batch of
    results, `settle(conn, item, info, outcome)` inside one metadata write, after a
    prepared rebuild has been recorded. Yields each batch's (item, settled) pairs once
    written (committing is the caller's)."""
    source = iter(items)

    def loaded() -> Iterator[tuple[_I, ExtentInfo | None]]:
        while batch := list(itertools.islice(source, LOAD_BATCH)):
            infos = pool.store.load_many(extent_of(item) for item in batch)
            for item in batch:
                yield item, infos.get(extent_of(item))

    def run(job: tuple[_I, ExtentInfo | None]) -> RebuiltExtent | Outcome:
        item, info = job
        if info is None:
            return "gone"
        try:
            return prepare(item, info)
        except (DynamicFSError, OSError) as exc:
            return exc

    def record(batch: list[tuple[_I, ExtentInfo | None, RebuiltExtent | Outcome]]
               ) -> list[tuple[_I, _T]]:
        out = []
        with pool.meta.write() as conn:
            for item, info, result in batch:
                if isinstance(result, RebuiltExtent):
                    result = pool.store.record_rebuilt(conn, result)
                out.append((item, settle(conn, item, info, result)))
        return out

    pending: list[tuple[_I, ExtentInfo | None, RebuiltExtent | Outcome]] = []
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as workers:
        # Enough in flight that the workers go on while this thread records a batch.
        for (item, info), result in in_order(workers, loaded(), run,
                                             RECORD_BATCH + 2 * threads):
            pending.append((item, info, result))
            if len(pending) >= RECORD_BATCH:
                yield record(pending)
                pending = []
    if pending:
        yield record(pending)
