"""The control socket protocol: JSON lines over a unix stream socket.

The client sends one line: {"op": NAME, "args": {...}}. The server answers with zero or
more progress lines {"progress": [done, total, message]} and then exactly one final
line, either {"result": VALUE} or {"error": MESSAGE, "exit_code": N}.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

SOCKET_NAME = "control.sock"


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
