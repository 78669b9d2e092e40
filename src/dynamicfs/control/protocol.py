"""The control socket protocol: JSON lines over a unix stream socket.

The client sends one line: {"op": NAME, "args": {...}}. The server answers with zero or
more progress lines {"progress": [done, total, message]} and heartbeats {"alive": true}
(at least every HEARTBEAT seconds while the operation runs or waits its turn), then
exactly one final line, either {"result": VALUE} or {"error": MESSAGE, "exit_code": N}.
A client that hears nothing for ANSWER_TIMEOUT seconds gives up: the daemon is stopped
or stuck.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

SOCKET_NAME = "control.sock"
HEARTBEAT = 5.0
ANSWER_TIMEOUT = 60.0
ANSWER_TIMEOUT_ENV = "DYNAMICFS_ANSWER_TIMEOUT"


def answer_timeout() -> float:
    """Seconds a client waits for the next line: $DYNAMICFS_ANSWER_TIMEOUT or 60."""
    try:
        return max(1.0, float(os.environ.get(ANSWER_TIMEOUT_ENV, ANSWER_TIMEOUT)))
    except ValueError:
        return ANSWER_TIMEOUT


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message, default=str).encode() + b"\n")


def lines(sock: socket.socket) -> Iterator[dict[str, Any]]:
    """Yield decoded JSON messages until the peer closes."""
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
