"""A background task of the mount daemon that runs every so many seconds on a thread of
its own, until stopped (metadata copies, the removal of empty segments)."""

from __future__ import annotations

import threading


class Periodic:
    """Calls tick() every `interval` seconds on a daemon thread between start() and stop()."""

    THREAD_NAME = "dynamicfs-periodic"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> object:
        raise NotImplementedError
