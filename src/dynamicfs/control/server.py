"""The control server inside the mount daemon: runs admin operations on the live pool.

One thread accepts connections; each connection gets a thread that reads one request,
runs the operation through the admin registry (so its effect is visible in the mount
at once) and streams progress and the result back. The socket is owner-only (0600).

Every request is run by admin.audited.run_audited with the peer's credentials (uid,
pid, from SO_PEERCRED), so operations that change the pool leave an audit record
naming who asked. Operations that change the pool run one at a time.

The server also owns the daemon's background work that admin operations steer: the
background scrub (maintenance/background.py) starts with the server and stops with
it, before the pool is closed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from dynamicfs.admin import registry
from dynamicfs.admin.audited import run_audited
from dynamicfs.control.protocol import HEARTBEAT, SOCKET_NAME, lines, send
from dynamicfs.engine.pool import Pool
from dynamicfs.errors import DynamicFSError
from dynamicfs.maintenance.background import BackgroundScrub
from dynamicfs.observability.audit import peer_actor
from dynamicfs.observability.log import debug, error

# Read-only monitoring operations run without `before_op` (which flushes every open
# file): a scrape every few seconds must not cut files being written into small extents.
NO_FLUSH = frozenset({"metrics", "health", "scrub-daemon-status"})


class ControlServer:
    def __init__(self, pool: Pool, before_op: Callable[[str], None] | None = None, *,
                 background: bool = True) -> None:
        self.pool = pool
        self.path = Path(pool.path) / SOCKET_NAME
        self.before_op = before_op
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._op_lock = threading.Lock()
        self.scrubber = BackgroundScrub(pool) if background else None

    def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="dynamicfs-control",
                                        daemon=True)
        self._thread.start()
        if self.scrubber is not None:
            self.scrubber.start()

    def stop(self) -> None:
        self._stopping.set()
        if self.scrubber is not None:
            self.scrubber.stop()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="dynamicfs-control-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = next(lines(conn))
            except (StopIteration, ValueError, OSError):
                return
            name = str(request.get("op", ""))
            args = request.get("args") or {}
            actor = peer_actor(conn)

            sending = threading.Lock()

            def say(message: dict[str, object]) -> None:
                with sending:
                    send(conn, message)

            def progress(done: int, total: int, message: str) -> None:
                with contextlib.suppress(OSError):
                    say({"progress": [done, total, message]})

            done = threading.Event()

            def heartbeat() -> None:  # the client gives up after silence (protocol.py)
                while not done.wait(HEARTBEAT):
                    try:
                        say({"alive": True})
                    except OSError:
                        return

            threading.Thread(target=heartbeat, daemon=True,
                             name="dynamicfs-control-heartbeat").start()
            try:
                op = registry.get(name)
                if self.before_op is not None and name not in NO_FLUSH:
                    self.before_op(name)
                if op.writes:
                    with self._op_lock:
                        result = run_audited(self.pool, name, args, actor, progress)
                        self.pool.meta.commit()  # the change and its audit record, durable
                else:
                    result = run_audited(self.pool, name, args, actor, progress)
                debug("admin operation", op=name, uid=actor.uid, via="control")
                say({"result": result})
            except DynamicFSError as exc:
                say({"error": str(exc), "exit_code": exc.exit_code})
            except OSError as exc:  # the client went away (Ctrl-C): the work is done
                debug("admin operation answered no one", op=name, reason=str(exc))
            except Exception as exc:  # a bug: keep the daemon alive, tell the client
                error("admin operation crashed", op=name, trace=traceback.format_exc())
                with contextlib.suppress(OSError):
                    say({"error": f"internal error in {name}: {exc!r} "
                                  "(see the pool's log)", "exit_code": 70})
            finally:
                done.set()
