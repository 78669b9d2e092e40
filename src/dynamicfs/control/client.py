"""The control client: send one admin operation to the mount daemon of a pool."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from dynamicfs.admin.registry import Progress
from dynamicfs.control.protocol import SOCKET_NAME, answer_timeout, lines, send
from dynamicfs.errors import DynamicFSError, PoolBusyError


class RemoteError(DynamicFSError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def socket_path(pool_dir: Path) -> Path:
    return Path(pool_dir) / SOCKET_NAME


def call(pool_dir: Path, op: str, args: dict[str, Any], progress: Progress | None = None) -> Any:
    path = socket_path(pool_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise PoolBusyError(f"pool {pool_dir} is locked but its mount daemon does not answer "
                            f"on {path} ({exc.strerror}); check 'dynamicfs mount' logs") from None
    timeout = answer_timeout()
    sock.settimeout(timeout)
    with sock:
        try:
            send(sock, {"op": op, "args": args})
            for message in lines(sock):
                if "progress" in message:
                    if progress is not None:
                        done, total, text = message["progress"]
                        progress(done, total, text)
                elif "result" in message:
                    return message["result"]
                elif "error" in message:
                    raise RemoteError(message["error"], int(message.get("exit_code", 1)))
        except TimeoutError:
            raise PoolBusyError(f"the mount daemon of {pool_dir} has not answered for "
                                f"{timeout:.0f}s; it may be stopped or stuck (see "
                                f"{Path(pool_dir) / 'mount.pid'} and the pool's log)") from None
        except ConnectionError:
            pass  # the daemon died mid-answer (a reset, not an end of file): said below
    raise PoolBusyError(f"the mount daemon of {pool_dir} closed the control connection "
                        "without an answer; see the pool's log")
