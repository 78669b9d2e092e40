"""JSON-lines logging for the whole package.

`log(event, level=..., **fields)` writes one JSON object per line with time, level,
event and whatever fields apply (pool, disk, extent, inode, path). Handlers are set
up once by the CLI or the mount daemon with `configure()`; a library user gets the
stdlib default (nothing printed below WARNING).

Two fields are added to every line without the caller naming them: `pool` (the pool
the process serves, given to `configure()`) and `request` (the id of the admin request
being served, set with `request_scope()` by the control server and the offline
runner), so a grep for one request id finds everything it caused.

The level comes from `configure(level=...)` (the `--log-level` options), else the
environment variable DYNAMICFS_LOG, else info. The log file is reopened when it is
moved away, so logrotate may rotate it without a signal.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.handlers
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

LEVELS = ("debug", "info", "warning", "error")
ENV_LEVEL = "DYNAMICFS_LOG"
LOG_DIR = "logs"
LOG_FILE = "dynamicfs.log"

_logger = logging.getLogger("dynamicfs")
_logger.addHandler(logging.NullHandler())
_request: contextvars.ContextVar[str | None] = contextvars.ContextVar("dynamicfs_request",
                                                                      default=None)
_defaults: dict[str, object] = {}


def timestamp(seconds: float) -> str:
    """UTC ISO 8601 with milliseconds, as every log and audit line writes it."""
    millis = int(seconds * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update(_defaults)
        request = _request.get()
        if request is not None:
            doc["request"] = request
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def level_from(level: str | None) -> int:
    """The logging level for a name, falling back to DYNAMICFS_LOG, then info."""
    for name in (level, os.environ.get(ENV_LEVEL)):
        if name and name.lower() in LEVELS:
            return int(getattr(logging, name.upper()))
    return logging.INFO


def configure(level: str | None = None, logfile: Path | None = None, stderr: bool = False,
              pool: str | None = None) -> None:
    """Send the package's log to `logfile` and/or stderr, replacing earlier handlers."""
    _logger.setLevel(level_from(level))
    _logger.propagate = False
    for handler in list(_logger.handlers):
        _logger.removeHandler(handler)
        handler.close()
    _defaults.clear()
    if pool is not None:
        _defaults["pool"] = pool
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.WatchedFileHandler(logfile)
        fh.setFormatter(JsonFormatter())
        _logger.addHandler(fh)
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(JsonFormatter())
        _logger.addHandler(sh)
    if not _logger.handlers:
        _logger.addHandler(logging.NullHandler())


def log_path(pool_dir: Path | str) -> Path:
    """POOL/logs/dynamicfs.log: where the pool's commands and mount daemon log."""
    return Path(pool_dir) / LOG_DIR / LOG_FILE


def configure_for_pool(pool_dir: Path, level: str | None = None, stderr: bool = False) -> None:
    """Log to POOL/logs/dynamicfs.log (and stderr in the foreground), naming the pool."""
    configure(level, log_path(pool_dir), stderr=stderr, pool=str(pool_dir))


def logs_to(path: Path) -> bool:
    """True if the log already goes to `path` (so a runner need not reconfigure it)."""
    return any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == Path(path)
               for h in _logger.handlers)


def new_request_id() -> str:
    return uuid.uuid4().hex[:12]


def current_request() -> str | None:
    return _request.get()


@contextlib.contextmanager
def request_scope(request_id: str | None = None) -> Iterator[str]:
    """Tag every line logged inside (in this thread or task) with a request id."""
    rid = request_id or new_request_id()
    token = _request.set(rid)
    try:
        yield rid
    finally:
        _request.reset(token)


def log(event: str, level: int = logging.INFO, **fields: object) -> None:
    if _logger.isEnabledFor(level):
        _logger.log(level, event, extra={"fields": fields})


def warn(event: str, **fields: object) -> None:
    log(event, logging.WARNING, **fields)


def error(event: str, **fields: object) -> None:
    log(event, logging.ERROR, **fields)


def debug(event: str, **fields: object) -> None:
    log(event, logging.DEBUG, **fields)
