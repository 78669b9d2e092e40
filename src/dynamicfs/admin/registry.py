"""The table of admin operations, shared by the offline CLI and the control socket.

Each operation is a function `fn(pool, **args)` returning plain data (dataclasses,
dicts, lists); `run()` turns the result into JSON-ready values so the CLI renders the
same thing whether the operation ran in-process or inside the mount daemon. An
operation that reports progress takes a `progress` keyword: a callable
`progress(done, total, message)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamicfs.engine.pool import Pool
from dynamicfs.errors import DynamicFSError

Progress = Callable[[int, int, str], None]

# Modules that register operations; imported on first use.
_MODULES = (
    "dynamicfs.admin.disks",
    "dynamicfs.admin.inspect",
    "dynamicfs.admin.drain",
    "dynamicfs.admin.integrity",
    "dynamicfs.admin.ops",
)


@dataclass(frozen=True)
class Operation:
    """`writes`: it changes the pool (and leaves an audit record). `changes_with`: the
    argument without which it only checks (scrub and fsck without `repair`), writing
    nothing but its own bookkeeping: such a run can check a pool whose directory is
    read-only (see changes())."""

    name: str
    fn: Callable[..., Any]
    writes: bool
    changes_with: str | None = None

    def changes(self, args: dict[str, Any]) -> bool:
        """Whether running with `args` changes the pool beyond its own bookkeeping."""
        if self.changes_with is not None:
            return bool(args.get(self.changes_with))
        return self.writes


OPERATIONS: dict[str, Operation] = {}


Handler = Callable[..., Any]


def operation(name: str, *, writes: bool = True,
              changes_with: str | None = None) -> Callable[[Handler], Handler]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        OPERATIONS[name] = Operation(name, fn, writes, changes_with)
        return fn
    return register


def load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def get(name: str) -> Operation:
    load_all()
    op = OPERATIONS.get(name)
    if op is None:
        raise DynamicFSError(f"unknown operation {name!r}")
    return op


def run(pool: Pool, name: str, args: dict[str, Any], progress: Progress | None = None) -> Any:
    op = get(name)
    kwargs = dict(args)
    if progress is not None and "progress" in inspect.signature(op.fn).parameters:
        kwargs["progress"] = progress
    return jsonable(op.fn(pool, **kwargs))


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Path):
        return str(value)
    return value
