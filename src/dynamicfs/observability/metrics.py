"""Prometheus metrics: what a pool is doing, and how long FUSE requests take.

Two kinds of metrics, one registry per process (`REGISTRY`, never prometheus_client's
global one):
- process-wide instruments updated as things happen: the FUSE request latency
  histogram `dynamicfs_fuse_op_seconds{op}` (the adapter calls `observe_fuse` for every
  request) and `dynamicfs_fuse_op_errors_total{op,errno}` (it counts failed requests);
- a collector over an open pool (`PoolCollector`), read at scrape time from the pool's
  live counters and its metadata: per-disk bytes and operations, error counters,
  capacity, use and state; extents by state; repairs and rebuilds; the repair queue;
  the progress of the manual and the background scrub.

`render(pool)` gives the Prometheus text of both; `serve_metrics()` serves `/metrics`
and `/health` over HTTP from a thread, and `start_metrics_server(pool, address)` is
what the mount daemon calls for `--metrics-address`.

Heavy metadata queries (extents by state) run on a read-only
connection (see health.Reader), so a scrape never holds the metadata lock while it
counts; they see the last committed state, at most a group commit old. Their results
are reused for ten times as long as they took to compute when that is more than
CACHE_THRESHOLD, so that scraping a large pool often costs at most a tenth of a core.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from dynamicfs.disks.health import STATES
from dynamicfs.errors import DynamicFSError
from dynamicfs.observability import health
from dynamicfs.observability.log import debug, error

if TYPE_CHECKING:
    from dynamicfs.engine.pool import Pool


# From 50 µs (a cached getattr) to 10 s (a read that waits on a failing disk).
FUSE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Metadata figures that took at least CACHE_THRESHOLD seconds to compute are reused for
# CACHE_FACTOR times as long; cheaper ones (small pools) are always fresh.
CACHE_FACTOR = 10.0
CACHE_THRESHOLD = 0.05
DEFAULT_PORT = 9464

REGISTRY = CollectorRegistry(auto_describe=True)
FUSE_OP_SECONDS = Histogram("dynamicfs_fuse_op_seconds",
                            "Time to answer a FUSE request, by operation", ["op"],
                            buckets=FUSE_BUCKETS, registry=REGISTRY)
FUSE_OP_ERRORS = Counter("dynamicfs_fuse_op_errors",
                         "FUSE requests answered with an error, by operation and errno",
                         ["op", "errno"], registry=REGISTRY)
ProcessCollector(registry=REGISTRY)

_fuse_children: dict[str, Any] = {}
_last_fuse: list[float] = [0.0]


# -- FUSE -------------------------------------------------------------------------------
def observe_fuse(op: str, seconds: float) -> None:
    """Record one FUSE request of `op` that took `seconds`."""
    child = _fuse_children.get(op)
    if child is None:
        child = _fuse_children.setdefault(op, FUSE_OP_SECONDS.labels(op))
    child.observe(seconds)
    _last_fuse[0] = time.monotonic()


def last_fuse_request() -> float:
    """time.monotonic() of the last FUSE request answered (0.0 if none yet)."""
    return _last_fuse[0]


# -- the pool -------------------------------------------------------------------------------
class _Cached:
    """A value recomputed when older than CACHE_FACTOR times its last computation."""

    def __init__(self, compute: Callable[[], Any]) -> None:
        self.compute = compute
        self.value: Any = None
        self.expires = 0.0
        self.lock = threading.Lock()

    def get(self) -> Any:
        with self.lock:
            now = time.monotonic()
            if now >= self.expires:
                self.value = self.compute()
                took = time.monotonic() - now
                if took >= CACHE_THRESHOLD:
                    self.expires = time.monotonic() + CACHE_FACTOR * took
            return self.value


class PoolCollector(Collector):
    """Everything a scrape reports about one open pool."""

    def __init__(self, pool: Pool) -> None:
        self._pool = weakref.ref(pool)
        self._figures = _Cached(self._metadata_figures)

    def _metadata_figures(self) -> dict[str, Any]:
        pool = self._pool()
        assert pool is not None
        db = health.reader(pool)
        tables = db.tables()
        return {
            "extents": health.count_extents(pool, db),
            "inodes": int(db.query("SELECT count(*) FROM inodes")[0][0]),
            "repair_queue": int(db.live("SELECT count(*) FROM repair_queue")[0][0]),
            "scrubs": [s for s in (health.manual_scrub(db, tables),
                                   health.background_scrub(db, tables)) if s is not None],
            "findings": health.scrub_findings(db, tables),
        }

    def collect(self) -> Iterator[Metric]:
        pool = self._pool()
        if pool is None:
            return
        figures = self._figures.get()
        yield from self._pool_info(pool, figures)
        yield from self._disks(pool, figures)
        yield from self._extents(figures)
        yield from self._repairs(pool, figures)
        yield from self._scrubs(figures)

    def _pool_info(self, pool: Pool, figures: dict[str, Any]) -> Iterator[Metric]:
        info = GaugeMetricFamily("dynamicfs_pool_info", "The pool this process serves",
                                 labels=["uuid", "path", "default_policy"])
        info.add_metric([pool.config.uuid, str(pool.path), pool.config.default_policy], 1)
        yield info
        yield GaugeMetricFamily("dynamicfs_inodes", "Files, directories and links in the pool",
                                value=figures["inodes"])

    def _disks(self, pool: Pool, figures: dict[str, Any]) -> Iterator[Metric]:
        disks = sorted(pool.disks.values(), key=lambda d: d.id)
        label = ["disk"]
        info = GaugeMetricFamily("dynamicfs_disk_info", "Each disk of the pool",
                                 labels=["disk", "uuid", "path", "tier"])
        state = GaugeMetricFamily("dynamicfs_disk_state", "1 for the health state each disk is in",
                                  labels=["disk", "state"])
        capacity = GaugeMetricFamily("dynamicfs_disk_capacity_bytes",
                                     "Bytes the pool may store on the disk", labels=label)
        used = GaugeMetricFamily("dynamicfs_disk_used_bytes",
                                 "Bytes of fragments on the disk", labels=label)
        read_bytes = CounterMetricFamily("dynamicfs_disk_read_bytes",
                                         "Fragment bytes read from the disk by this process",
                                         labels=label)
        written_bytes = CounterMetricFamily("dynamicfs_disk_written_bytes",
                                            "Fragment bytes written to the disk by this "
                                            "process", labels=label)
        reads = CounterMetricFamily("dynamicfs_disk_reads",
                                    "Fragments read from the disk by this process", labels=label)
        writes = CounterMetricFamily("dynamicfs_disk_writes",
                                     "Fragments written to the disk by this process",
                                     labels=label)
        errors = CounterMetricFamily("dynamicfs_disk_errors",
                                     "I/O and checksum errors seen on the disk, ever",
                                     labels=["disk", "kind"])
        for d in disks:
            disk = str(d.id)
            info.add_metric([disk, d.uuid, d.path, d.tier], 1)
            for s in STATES:
                state.add_metric([disk, s], 1 if d.state == s else 0)
            try:
                capacity.add_metric([disk], pool.store.disk_capacity(d.id))
            except OSError:  # a vanished disk directory: no capacity to report
                pass
            used.add_metric([disk], d.used)
            read_bytes.add_metric([disk], d.bytes_read)
            written_bytes.add_metric([disk], d.bytes_written)
            reads.add_metric([disk], d.reads)
            writes.add_metric([disk], d.writes)
            errors.add_metric([disk, "read"], d.read_errors)
            errors.add_metric([disk, "write"], d.write_errors)
            errors.add_metric([disk, "checksum"], d.checksum_errors)
        yield from (info, state, capacity, used, read_bytes, written_bytes, reads, writes, errors)

    def _extents(self, figures: dict[str, Any]) -> Iterator[Metric]:
        counts: health.ExtentCounts = figures["extents"]
        extents = GaugeMetricFamily("dynamicfs_extents", "Extents by state, from the metadata",
                                    labels=["state"])
        nbytes = GaugeMetricFamily("dynamicfs_extent_bytes",
                                   "Bytes of file data in extents, by state", labels=["state"])
        for s in health.EXTENT_STATES:
            extents.add_metric([s], getattr(counts, s))
            nbytes.add_metric([s], counts.bytes[s])
        yield extents
        yield nbytes
        found = GaugeMetricFamily("dynamicfs_scrub_problem_extents",
                                  "Extents the last scrub found in trouble (still existing), "
                                  "by verdict", labels=["state"])
        for s in ("under-redundant", "unreadable", "repaired"):
            found.add_metric([s.replace("-", "_")], len(figures["findings"].get(s, [])))
        yield found

    def _repairs(self, pool: Pool, figures: dict[str, Any]) -> Iterator[Metric]:
        stats = pool.store.stats
        yield GaugeMetricFamily("dynamicfs_repair_queue_extents",
                                "Extents queued for repair in the metadata",
                                value=figures["repair_queue"])
        yield GaugeMetricFamily("dynamicfs_repair_wanted_extents",
                                "Extents this process found needing repair and not yet repaired",
                                value=len(pool.store.repair_wanted))
        for name, key, text in (
                ("rebuild_attempts", "rebuild_attempts", "Extent rebuilds (repairs) attempted"),
                ("rebuild_successes", "rebuild_done", "Extent rebuilds that placed new fragments"),
                ("rebuild_failures", "rebuild_failed", "Extent rebuilds that found the extent "
                                                       "unreadable"),
                ("rebuild_bytes", "rebuild_bytes", "Fragment bytes written by rebuilds")):
            yield CounterMetricFamily(f"dynamicfs_{name}", f"{text}, since the pool was opened",
                                      value=stats.get(key, 0))

    def _scrubs(self, figures: dict[str, Any]) -> Iterator[Metric]:
        label = ["scrub"]
        progress = GaugeMetricFamily("dynamicfs_scrub_progress_ratio",
                                     "Share of extents the current or last scrub pass checked",
                                     labels=label)
        running = GaugeMetricFamily("dynamicfs_scrub_in_progress",
                                    "1 while a scrub pass is under way (or interrupted)",
                                    labels=label)
        checked = GaugeMetricFamily("dynamicfs_scrub_checked_extents",
                                    "Extents checked by the current or last scrub pass",
                                    labels=label)
        remaining = GaugeMetricFamily("dynamicfs_scrub_remaining_extents",
                                      "Extents the current scrub pass has yet to check",
                                      labels=label)
        started = GaugeMetricFamily("dynamicfs_scrub_started_timestamp_seconds",
                                    "When the current or last scrub pass started", labels=label)
        finished = GaugeMetricFamily("dynamicfs_scrub_finished_timestamp_seconds",
                                     "When the last complete scrub pass finished", labels=label)
        for s in figures["scrubs"]:
            kind = [s.kind]
            progress.add_metric(kind, s.progress)
            running.add_metric(kind, 1 if s.in_progress else 0)
            checked.add_metric(kind, s.checked)
            remaining.add_metric(kind, s.remaining)
            if s.started is not None:
                started.add_metric(kind, s.started)
            last = s.finished if s.finished is not None else s.detail.get("last_pass_finished")
            if isinstance(last, int | float):
                finished.add_metric(kind, last)
        yield from (progress, running, checked, remaining, started, finished)


class _ProcessWide(Collector):
    """The process registry's metrics, inside a pool's registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


_registries: weakref.WeakKeyDictionary[Pool, CollectorRegistry] = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def registry_for(pool: Pool) -> CollectorRegistry:
    """A registry with the pool's collector and the process-wide metrics."""
    with _registries_lock:
        found = _registries.get(pool)
        if found is None:
            found = CollectorRegistry(auto_describe=False)
            found.register(PoolCollector(pool))
            found.register(_ProcessWide())
            _registries[pool] = found
        return found


def render(pool: Pool) -> str:
    """The Prometheus text exposition of everything about `pool` and this process."""
    return generate_latest(registry_for(pool)).decode()


def health_document(pool: Pool) -> dict[str, Any]:
    return jsonable(health.build_report(pool))


def jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# -- HTTP -----------------------------------------------------------------------------------
def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'127.0.0.1:9464', '[::1]:9464', ':9464' or '9464' -> (host, port)."""
    value = text.strip()
    host, port_text = default_host, value
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        host = host or default_host
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise DynamicFSError(f"malformed metrics address {text!r}: use HOST:PORT, e.g. "
                             f"127.0.0.1:{DEFAULT_PORT}") from None
    return host, port


def listen_address(address: str, port: int | None) -> str:
    """`metrics-server`'s --address and --port as one HOST:PORT: the address may carry
    the port itself ('127.0.0.1:9464', '[::1]:9464'), as `mount --metrics-address`
    takes it; a bare IPv6 address ('::1') has none. Without one anywhere, DEFAULT_PORT."""
    value = address.strip()
    after_bracket = value.partition("]")[2] if value.startswith("[") else None
    in_address: int | None = None
    if after_bracket or (after_bracket is None and value.count(":") == 1):
        host, in_address = parse_address(value)  # the port is in it
    else:
        host = value.strip("[]") or "127.0.0.1"
    if in_address is not None and port is not None and port != in_address:
        raise DynamicFSError(f"the address {address!r} names port {in_address} and --port "
                             f"{port}; give the port once")
    chosen = in_address if in_address is not None else port if port is not None \
        else DEFAULT_PORT
    return f"[{host}]:{chosen}" if ":" in host else f"{host}:{chosen}"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """`/metrics` and `/health` over HTTP, served from a thread until stop()."""

    def __init__(self, address: str, metrics: Callable[[], str],
                 health_doc: Callable[[], dict[str, Any]]) -> None:
        host, port = parse_address(address)
        handler = _handler(metrics, health_doc)
        try:
            is_v6 = ipaddress.ip_address(host).version == 6
        except ValueError:
            is_v6 = False
        try:
            self.httpd: _Server = (_Server6 if is_v6 else _Server)((host, port), handler)
        except OSError as exc:
            raise DynamicFSError(f"cannot serve metrics on {host}:{port}: {exc.strerror}; "
                                 "pick another address or port") from None
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        name="dynamicfs-metrics")
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


def _handler(metrics: Callable[[], str],
             health_doc: Callable[[], dict[str, Any]]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "dynamicfs"

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            path = self.path.split("?", 1)[0]
            try:
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE_LATEST, metrics().encode())
                elif path == "/health":
                    doc = health_doc()
                    code = 200 if doc.get("status") == health.HEALTHY_STATUS else 503
                    self._send(code, "application/json",
                               json.dumps(doc, indent=2, default=str).encode() + b"\n")
                elif path == "/":
                    self._send(200, "text/plain; charset=utf-8",
                               b"DynamicFS: see /metrics (Prometheus) and /health (JSON)\n")
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found\n")
            except Exception as exc:  # report, keep serving
                error("metrics request failed", path=path, reason=repr(exc))
                self._send(500, "text/plain; charset=utf-8", f"error: {exc}\n".encode())

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            debug("metrics request", client=self.client_address[0], request=format % args)

    return Handler


def serve_metrics(pool: Pool, address: str) -> MetricsServer:
    return MetricsServer(address, lambda: render(pool), lambda: health_document(pool))


def start_metrics_server(pool: Pool, address: str) -> Callable[[], None]:
    """Serve the pool's /metrics and /health at `address` (HOST:PORT); returns stop()."""
    return serve_metrics(pool, address).stop
