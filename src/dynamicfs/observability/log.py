"""JSON-lines logging for the whole package.

`log(event, level=..., **fields)` writes one JSON object per line with time, level,
event and whatever fields apply (pool, disk, extent, inode, path). Handlers are set
up once by the CLI or the mount daemon with `configure()`; a library user gets the
stdlib default (nothing printed below WARNING).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

_logger = logging.getLogger("dynamicfs")
_logger.addHandler(logging.NullHandler())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str | None = None, logfile: Path | None = None, stderr: bool = False) -> None:
    level_name = (level or os.environ.get("DYNAMICFS_LOG") or "info").upper()
    _logger.setLevel(getattr(logging, level_name, logging.INFO))
    _logger.propagate = False
    for handler in list(_logger.handlers):
        _logger.removeHandler(handler)
        handler.close()
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logfile)
        fh.setFormatter(JsonFormatter())
        _logger.addHandler(fh)
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(JsonFormatter())
        _logger.addHandler(sh)


def log(event: str, level: int = logging.INFO, **fields: object) -> None:
    if _logger.isEnabledFor(level):
        _logger.log(level, event, extra={"fields": fields})


def warn(event: str, **fields: object) -> None:
    log(event, logging.WARNING, **fields)


def error(event: str, **fields: object) -> None:
    log(event, logging.ERROR, **fields)


def debug(event: str, **fields: object) -> None:
    log(event, logging.DEBUG, **fields)
