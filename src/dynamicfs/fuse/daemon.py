"""The mount daemon: the process that owns a pool while it is mounted.

Start-up, each step undone in reverse at exit: configure the JSON log
(POOL/logs/dynamicfs.log), open the pool (takes POOL/pool.lock), start the namespace,
mount (fuse/session.py), write POOL/mount.json and POOL/mount.pid, start the control
server (POOL/control.sock), raise the mount's read-ahead, tell the starter it is
ready. It then serves FUSE requests until the filesystem is unmounted (`dynamicfs
unmount`, `fusermount3 -u`, `umount`) or it gets SIGTERM or SIGINT, in which case it
unmounts itself lazily (programs with files open there get ENOTCONN for anything
they ask after that). At exit every file is flushed and the metadata committed
(Namespace.close(), then Pool.close()); mount.json, mount.pid and the control socket
are removed.

`start_detached()` runs the daemon as `python -m dynamicfs.fuse.daemon` in a new
session with its output in POOL/logs/daemon.out, and returns once the mount is ready
(the daemon reports over a pipe) or raises with the daemon's reason. `unmount()`
unmounts and waits until the daemon has exited, so the pool can be opened again, and
returns what the daemon logged at exit that no program was told of (data it could not
store, a failure closing the pool).

This module wires every layer of the process together, so it is the one place in
the fuse layer that imports control. It never prints: callers pass `ready` callbacks.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dynamicfs.control.protocol import SOCKET_NAME
from dynamicfs.control.server import ControlServer
from dynamicfs.disks.faulty import ENV_VAR as FAULTS_ENV
from dynamicfs.disks.faulty import FaultSpecError, wrap_backends
from dynamicfs.engine.pool import (
    MOUNT_INFO,
    Pool,
    PoolLock,
    check_pool_dir,
    is_pool,
    mount_info,
    pid_alive,
)
from dynamicfs.errors import DynamicFSError, PoolBusyError
from dynamicfs.fuse.adapter import Operations
from dynamicfs.fuse.session import MountError, MountRequest, Session, split_options
from dynamicfs.maintenance.gc import SegmentSweeper
from dynamicfs.maintenance.metacopy import PeriodicCopier
from dynamicfs.maintenance.rebuilder import BackgroundRebuild
from dynamicfs.meta.paths import PathResolver
from dynamicfs.meta.store import DB_NAME
from dynamicfs.mounttable import FSTYPE, find_mount, mount_holding, mounts
from dynamicfs.namespace.fs import Namespace
from dynamicfs.observability.log import (
    LEVELS,
    LOG_DIR,
    configure_for_pool,
    error,
    log,
    log_path,
)
from dynamicfs.observability.metrics import parse_address, start_metrics_server

PID_FILE = "mount.pid"
DAEMON_OUT = "daemon.out"
GIL_SWITCH_INTERVAL = 0.0002
READ_AHEAD_KB = 1024
START_TIMEOUT = 120.0
EXIT_TIMEOUT = 600.0
# What the daemon logs, with its pid, when it ends and something went wrong that no
# program was told of: unmount() looks for these to say so.
UNSTORED_EVENT = "data not stored at unmount"
CRASH_EVENT = "mount daemon crashed"
UNSTORED_NAMED = 5  # files named in unmount's message; the log has all of them

# Options that mean something to mount(8) or fstab only; they never reach the mount.
_FSTAB_ONLY = {"defaults", "rw", "auto", "noauto", "user", "users", "nouser", "owner",
               "group", "_netdev", "nofail"}
_FSTAB_ONLY_PREFIXES = ("x-", "comment=", "helper=")
# Options DynamicFS sets itself.
_RESERVED_PREFIXES = ("fsname=", "subtype=")


@dataclass
class MountOptions:
    """User mount options, split into what the daemon handles and what goes to the
    mount itself (fuse/session.MountRequest: mount flags, allow_other, allow_root)."""

    fuse: list[str] = field(default_factory=list)
    nonempty: bool = False
    log_level: str | None = None
    metrics_address: str | None = None


def parse_options(groups: Iterable[str]) -> MountOptions:
    """Parse `-o` values such as 'ro,allow_other' (several may be given)."""
    out = MountOptions()
    for group in groups:
        for opt in (o.strip() for o in group.split(",")):
            if not opt or opt in _FSTAB_ONLY or opt.startswith(_FSTAB_ONLY_PREFIXES):
                continue
            if opt == "nonempty":
                out.nonempty = True
            elif opt.startswith("log_level="):
                out.log_level = _log_level(opt.partition("=")[2])
            elif opt.startswith("metrics_address="):
                out.metrics_address = opt.partition("=")[2]
                parse_address(out.metrics_address)  # refuse a malformed one before mounting
            elif opt.startswith(_RESERVED_PREFIXES):
                raise MountError(f"mount option {opt!r} is set by DynamicFS itself; leave it out")
            elif not opt.isascii():
                raise MountError(f"mount option {opt!r} is not ASCII")
            elif opt not in out.fuse:
                out.fuse.append(opt)
    split_options(out.fuse)  # refuse what the mount would refuse, before starting
    return out


def _log_level(text: str) -> str:
    if text.lower() not in LEVELS:
        raise MountError(f"unknown log level {text!r}; use one of {', '.join(LEVELS)}")
    return text.lower()


# ---------------------------------------------------------------------- checks
def check_mountable(pool: Path | str, mountpoint: Path | str,
                    options: MountOptions) -> tuple[Path, Path]:
    """Refuse, with one line, what would fail or surprise: returns absolute (pool, mountpoint).

    Runs in the starter before anything forks: a pool already mounted (PoolBusyError
    says where), a missing or non-directory mountpoint, a non-empty mountpoint without
    `-o nonempty`, a broken mount left on the mountpoint.
    """
    pool_dir = check_pool_dir(pool)
    lock = PoolLock(pool_dir)
    try:
        lock.acquire()
    except PoolBusyError:
        info = mount_info(pool_dir)
        if not info:
            raise
        raise PoolBusyError(f"pool {pool_dir} is already mounted at {info.get('mountpoint')} "
                            f"(pid {info.get('pid')}); unmount it first with "
                            f"'dynamicfs unmount {info.get('mountpoint')}'") from None
    lock.release()
    mnt = Path(os.path.realpath(mountpoint))  # mount(2) mounts on what a symlink names
    try:
        st = os.stat(mnt)
        entries = os.listdir(mnt) if stat.S_ISDIR(st.st_mode) else []
    except FileNotFoundError:
        raise MountError(f"mountpoint {mnt} does not exist; create it with "
                         f"'mkdir -p {mnt}'") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"cannot mount at {mnt}: {not_connected(mnt)}") from None
        raise MountError(f"cannot use mountpoint {mnt}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mnt} is not a directory")
    # The daemon would wait on itself for the pool's own files: it hangs.
    if _inside(pool_dir, mnt):
        raise MountError(f"mountpoint {mnt} holds the pool directory {pool_dir}, which the "
                         "mount would hide; mount it elsewhere")
    for disk in _disk_paths(pool_dir):
        if _inside(disk, mnt):
            raise MountError(f"mountpoint {mnt} holds disk {disk} of this pool, which the "
                             "mount would hide; mount it elsewhere")
    if entries and not options.nonempty:
        raise MountError(f"mountpoint {mnt} is not empty; use an empty directory or add "
                         "'-o nonempty' to hide its contents while mounted")
    if _inside(mnt, pool_dir):
        raise MountError(f"mountpoint {mnt} is inside the pool directory {pool_dir}; "
                         "mount it elsewhere")
    return pool_dir, mnt


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


# ---------------------------------------------------------------------- the daemon
def mount_request(pool_dir: Path, mnt: Path, options: MountOptions) -> MountRequest:
    """What to mount: the pool path as fsname lets `unmount` (and df, findmnt) find the
    pool of a mount; the mount table splits fields at white space and options at commas."""
    path = str(pool_dir)
    fsname = path if path.isascii() and not any(c in path for c in ",\\ \t\n") else "dynamicfs"
    return MountRequest(mnt, fsname, FSTYPE.removeprefix("fuse."),
                        ["default_permissions", *options.fuse])


def _raise_read_ahead(mountpoint: Path) -> None:
    """Let the kernel read 1 MiB ahead (it asks 128 KiB at a time otherwise).

    Must run once the kernel has processed FUSE_INIT (which caps read-ahead): stat()
    of the mountpoint is a request to this process, answered only after INIT.
    """
    try:
        dev = os.stat(mountpoint).st_dev
        path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        path.write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log("read-ahead unchanged", mountpoint=str(mountpoint), reason=exc.strerror)


def _write_mount_files(pool_dir: Path, mountpoint: Path, opts: set[str]) -> None:
    info = {"mountpoint": str(mountpoint), "pid": os.getpid(), "started": time.time(),
            "options": sorted(opts)}
    for name, text in ((MOUNT_INFO, json.dumps(info) + "\n"), (PID_FILE, f"{os.getpid()}\n")):
        tmp = pool_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, pool_dir / name)


def _remove_mount_files(pool_dir: Path) -> None:
    for name in (MOUNT_INFO, PID_FILE):
        with contextlib.suppress(FileNotFoundError):
            (pool_dir / name).unlink()


def _serve_fuse(session: Session, ready: Callable[[], None]) -> None:
    """Serve FUSE requests until unmounted or told to stop by SIGTERM/SIGINT.

    `ready` is called once the mount answers requests. SIGTERM and SIGINT are blocked
    in every thread (see serve()) for Session.wait to take them.
    """
    session.start()
    _raise_read_ahead(session.request.mountpoint)
    ready()
    signum = session.wait()
    if signum is not None:
        log("stopping on signal", signal=signal.Signals(signum).name)


def serve(pool: Path, mountpoint: Path, options: MountOptions, *, foreground: bool,
          ready: Callable[[], None]) -> int:
    """Be the mount daemon of `pool` at `mountpoint` until unmounted; returns an exit code.

    Raises DynamicFSError if the mount cannot be set up; `ready` is called once the
    filesystem answers requests.
    """
    pool_dir, mnt = Path(pool).absolute(), Path(mountpoint).absolute()
    configure_for_pool(pool_dir, options.log_level, stderr=foreground)
    # The FUSE workers answer requests between the flusher's and the disk writers'
    # turns at the interpreter; a request that finds them running waits for the switch
    # interval, and a writer such as dd sends its next request only after the reply.
    # Measured here against Python's 5 ms: 1 ms created 10,000 small files ~9% faster;
    # 0.2 ms then wrote 1 GiB of ec:4+2 ~6% faster than 1 ms (482 against 454 MiB/s
    # over six pairs of runs) and small files ~5% faster.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # SIGTERM/SIGINT stay blocked in every thread (threads started from here on inherit
    # the mask) and wait for _serve_fuse to take them: a signal during start-up must not
    # leave a dead mount.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        return _serve_pool(pool_dir, mnt, options, ready)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _serve_pool(pool_dir: Path, mnt: Path, options: MountOptions,
                ready: Callable[[], None]) -> int:
    pool_obj = Pool.open(pool_dir)
    try:
        _inject_faults(pool_obj)
        namespace = Namespace(pool_obj)
        copier = PeriodicCopier(pool_obj)
        try:
            request = mount_request(pool_dir, mnt, options)
            opts = set(request.option_names())
            if request.allow_root:  # the kernel is asked for allow_other; others are refused
                opts = (opts - {"allow_other"}) | {"allow_root"}
            rebuilder = BackgroundRebuild(pool_obj)
            sweeper = SegmentSweeper(pool_obj)
            control = ControlServer(pool_obj, before_op=lambda name: namespace.sync_all())
            stop_metrics: Callable[[], None] | None = None
            session = Session(request, Operations(namespace).handle)
            try:
                _write_mount_files(pool_dir, mnt, opts)
                control.start()
                rebuilder.start()
                sweeper.start()
                copier.start()
                if options.metrics_address:
                    stop_metrics = start_metrics_server(pool_obj, options.metrics_address)
                log("mounted", pool=str(pool_dir), mountpoint=str(mnt), options=sorted(opts),
                    pid=os.getpid())
                _serve_fuse(session, ready)
            finally:
                if stop_metrics is not None:
                    stop_metrics()
                control.stop()
                rebuilder.stop()
                sweeper.stop()
                copier.stop()
                session.close()
                log("unmounted", mountpoint=str(mnt))
        finally:
            unreported = namespace.close()
            if unreported:
                _log_unstored(pool_obj, unreported)
            copier.final()
    finally:
        _remove_mount_files(pool_dir)
        pool_obj.close()
        log("pool closed", pool=str(pool_dir))
    return 0


def _inject_faults(pool: Pool) -> None:
    """Run over failing disks when $DYNAMICFS_FAULTS says so (tests; see disks/faulty.py)."""
    spec = os.environ.get(FAULTS_ENV)
    if not spec:
        return
    try:
        wrapped = wrap_backends(pool, spec)
    except FaultSpecError as exc:
        raise MountError(f"{FAULTS_ENV}: {exc}") from None
    log("injecting disk faults", spec=spec, disks=sorted(wrapped))


# ---------------------------------------------------------------------- starting detached
def start_detached(pool: Path, mountpoint: Path, options: MountOptions,
                   timeout: float = START_TIMEOUT) -> int:
    """Start the daemon in its own session; return its pid once the mount is ready."""
    pool_dir, mnt = Path(pool).absolute(), Path(mountpoint).absolute()
    log_dir = pool_dir / LOG_DIR
    try:
        log_dir.mkdir(exist_ok=True)
        out = open(log_dir / DAEMON_OUT, "ab")
    except OSError as exc:
        raise MountError(f"cannot write the daemon log in {log_dir}: {exc.strerror}") from None
    read_end, write_end = os.pipe()
    cmd = [sys.executable, "-m", "dynamicfs.fuse.daemon", "--ready-fd", str(write_end)]
    if options.log_level:
        cmd += ["--log-level", options.log_level]
    if options.metrics_address:
        cmd += ["-o", f"metrics_address={options.metrics_address}"]
    if options.nonempty:
        cmd += ["-o", "nonempty"]
    for opt in options.fuse:
        cmd += ["-o", opt]
    cmd += ["--", str(pool_dir), str(mnt)]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                pass_fds=(write_end,), start_new_session=True, cwd="/")
    finally:
        os.close(write_end)
        out.close()
    try:
        report = _read_report(read_end, timeout)
    finally:
        os.close(read_end)
    if report is None:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            raise MountError(f"the mount daemon (pid {proc.pid}) did not get ready within "
                             f"{timeout:.0f}s; see {log_dir / DAEMON_OUT}") from None
        raise MountError(f"the mount daemon exited with code {code} before the mount was "
                         f"ready{_last_words(log_dir / DAEMON_OUT)}; see {log_dir / DAEMON_OUT}")
    if "error" in report:
        proc.wait()
        error_ = MountError(str(report["error"]))
        error_.exit_code = int(str(report.get("exit_code", 1)))
        raise error_
    return proc.pid


def _read_report(fd: int, timeout: float) -> dict[str, object] | None:
    """The daemon's one-line JSON report, or None if it closed the pipe without one."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    line = data.split(b"\n", 1)[0]
    try:
        return dict(json.loads(line)) if line else None
    except ValueError:
        return None


def _log_unstored(pool: Pool, errors: dict[int, int]) -> None:
    """Name in the log the files whose data could not be stored with no program told
    (written and closed before the write-back failed): unmount() reports it."""
    try:
        with pool.meta.read() as conn:
            resolver = PathResolver(conn)
            files = [resolver.paths(ino)[0] for ino in sorted(errors)]
    except sqlite3.Error:  # the metadata failing too: the inodes say it still
        files = [f"<inode {ino}>" for ino in sorted(errors)]
    error(UNSTORED_EVENT, pid=os.getpid(), files=files,
          reasons=sorted({os.strerror(code) for code in errors.values()}))


def _last_words(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f" ({lines[-1].strip()})" if lines else ""


# ---------------------------------------------------------------------- unmounting
@dataclass
class Unmounted:
    mountpoint: str
    pool: str | None
    pid: int | None
    # What went wrong as the daemon ended that no program was told of (data that could
    # not be stored, a failure closing the pool), or None.
    problem: str | None = None


def unmount(target: Path | str, *, lazy: bool = False, timeout: float = EXIT_TIMEOUT) -> Unmounted:
    """Unmount a DynamicFS mount (given its mountpoint or its pool) and wait for its daemon.

    Returns once the daemon has flushed everything and exited, so the pool can be
    mounted or opened again at once.
    """
    path, pool_dir = _resolve(target)
    pid = _daemon_pid(pool_dir, path) if pool_dir else None
    logfile = log_path(pool_dir) if pool_dir else None
    mark = _size(logfile) if logfile else 0
    _fusermount_u(path, lazy)
    problem = None
    if pid is not None and not lazy:
        _wait_exit(pid, timeout, path)
        if logfile is not None:
            problem = _exit_problem(logfile, mark, pid)
    if pool_dir is not None and pid is None:
        _clear_stale(pool_dir)
    return Unmounted(str(path), str(pool_dir) if pool_dir else None, pid, problem)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _exit_problem(logfile: Path, mark: int, pid: int) -> str | None:
    """What the daemon `pid` logged after `mark` about data it could not store or a
    failure at exit, in a few words, or None."""
    try:
        with open(logfile, "rb") as f:
            if f.seek(0, os.SEEK_END) < mark:
                mark = 0  # the log was rotated meanwhile
            f.seek(mark)
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict) or event.get("pid") != pid:
            continue
        if event.get("event") == UNSTORED_EVENT:
            files = [str(f) for f in event.get("files", [])]
            named = ", ".join(files[:UNSTORED_NAMED])
            more = f" and {len(files) - UNSTORED_NAMED} more" if len(files) > UNSTORED_NAMED \
                else ""
            reasons = "; ".join(map(str, event.get("reasons", []))) or "unknown reason"
            count = f"{len(files)} file" + ("s" if len(files) != 1 else "")
            return (f"data last written to {count} could not be stored "
                    f"({reasons}): {named}{more}. Reading that data fails with an I/O "
                    "error until the files are written again")
        if event.get("event") == CRASH_EVENT:
            return (f"the mount daemon failed while closing the pool "
                    f"({event.get('reason', 'no reason given')})")
    return None


def _resolve(target: Path | str) -> tuple[Path, Path | None]:
    """The mountpoint and (when it can tell) the pool of the DynamicFS mount given by its
    mountpoint or its pool directory."""
    path = Path(os.path.realpath(target))
    pool_dir: Path | None = None
    if _is_pool(path):
        pool_dir = path
        info = mount_info(path)
        if not info:
            raise MountError(f"pool {path} is not mounted")
        path = Path(str(info["mountpoint"]))
    entry = find_mount(path)
    if entry is None or entry.fstype != FSTYPE:
        what = "nothing" if entry is None else f"a {entry.fstype} filesystem"
        raise MountError(f"{path} is not a DynamicFS mount ({what} is mounted there)")
    if pool_dir is None and _is_pool(Path(entry.source)):
        pool_dir = Path(entry.source)
    return path, pool_dir


def pool_of(target: Path | str) -> tuple[Path, Path | None]:
    """The pool directory and mountpoint (None: not mounted) of `target`: a pool, a
    DynamicFS mountpoint or any path inside a DynamicFS mount."""
    path = Path(os.path.realpath(target))
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise MountError(f"{target} does not exist") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:  # ENOTCONN: a mount whose daemon is gone, below
            raise MountError(f"cannot reach {target}: {exc.strerror}") from None
    if _is_pool(path):
        info = mount_info(path)
        mountpoint = Path(str(info["mountpoint"])) if info else None
        entry = find_mount(mountpoint) if mountpoint else None
        return path, mountpoint if entry and entry.fstype == FSTYPE else None
    found = mount_holding(path)
    if found is not None and found[1].fstype == FSTYPE:
        place, entry = found
        if not _is_pool(Path(entry.source)):
            raise MountError(f"cannot tell which pool is mounted at {place}; give the pool "
                             "directory instead")
        return Path(entry.source), place
    raise MountError(f"{target} is neither a pool nor inside a DynamicFS mount")


def not_connected(path: Path | str) -> str:
    """What to tell a user about `path`, which gave ENOTCONN: it lies in a FUSE mount
    whose daemon has stopped."""
    found = mount_holding(Path(os.path.realpath(path)))
    if found is None:
        return f"{path} is not connected (a FUSE mount whose daemon has stopped?)"
    place, entry = found
    if entry.fstype != FSTYPE:
        return (f"the FUSE mount at {place} is not connected: its daemon has stopped; "
                f"clear it with 'fusermount3 -u {place}'")
    return (f"the DynamicFS mount at {place} is not connected: its daemon has stopped; "
            f"clear it with 'dynamicfs unmount {place}' and mount the pool again")


def _disk_paths(pool_dir: Path) -> list[Path]:
    """The disk directories the pool's metadata lists (none if it cannot be read)."""
    try:
        conn = sqlite3.connect(f"{(pool_dir / DB_NAME).as_uri()}?mode=ro", uri=True)
        try:
            return [Path(p) for (p,) in conn.execute("SELECT path FROM disks")]
        finally:
            conn.close()
    except sqlite3.Error:
        return []


def check_outside_own_mount(pool: Path | str, path: Path | str) -> None:
    """Refuse `path` as a disk of `pool` when it lies in a mount of that very pool: the
    daemon would wait on itself to store data there."""
    found = mount_holding(Path(os.path.realpath(path)))
    if found is None or found[1].fstype != FSTYPE:
        return
    place, entry = found
    try:
        same = _is_pool(Path(entry.source)) and os.path.samefile(entry.source, pool)
    except OSError:  # no such pool: the command says so
        return
    if same:
        raise MountError(f"{path} is inside {place}, the mount of this pool: a pool cannot "
                         "keep its data in itself; use a directory outside the mount")


def check_served(pool_dir: Path, mountpoint: Path) -> None:
    """Raise MountError unless a mount daemon of `pool_dir` serves `mountpoint`."""
    if _daemon_pid(pool_dir, mountpoint) is None:
        raise MountError(not_connected(mountpoint))


def dynamicfs_mounts() -> list[tuple[Path, Path | None]]:
    """(mountpoint, pool or None if it cannot tell) of every DynamicFS mount here."""
    return [(Path(e.mountpoint), Path(e.source) if _is_pool(Path(e.source)) else None)
            for e in mounts() if e.fstype == FSTYPE]


def _is_pool(path: Path) -> bool:
    try:
        return is_pool(path)
    except OSError:  # e.g. a dead FUSE mount: ENOTCONN
        return False


def _daemon_pid(pool_dir: Path, mountpoint: Path) -> int | None:
    info = mount_info(pool_dir)
    if not info or info.get("mountpoint") != str(mountpoint):
        return None
    pid = int(str(info.get("pid", 0)))
    return pid if pid > 0 and pid_alive(pid) else None


def _clear_stale(pool_dir: Path) -> None:
    """After a daemon died: drop the mount files it left, unless someone holds the pool."""
    lock = PoolLock(pool_dir)
    try:
        lock.acquire()
    except DynamicFSError:
        return
    try:
        _remove_mount_files(pool_dir)
        with contextlib.suppress(FileNotFoundError):
            (pool_dir / SOCKET_NAME).unlink()
    finally:
        lock.release()


def _fusermount_u(mountpoint: Path, lazy: bool) -> None:
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise MountError("fusermount3 is not installed; install the fuse3 package") from None
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        if "busy" in said.lower():
            raise MountError(f"{mountpoint} is busy: close the files and leave the directories "
                             f"in it (see 'fuser -vm {mountpoint}'), or use --lazy")
        raise MountError(f"cannot unmount {mountpoint}: {said.removeprefix('fusermount3: ')}")


def _wait_exit(pid: int, timeout: float, mountpoint: Path) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise MountError(f"{mountpoint} is unmounted but its daemon (pid {pid}) is still "
                             f"flushing after {timeout:.0f}s; see the pool's log")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """`python -m dynamicfs.fuse.daemon`: what start_detached() runs."""
    parser = argparse.ArgumentParser(prog="dynamicfs-daemon")
    parser.add_argument("--ready-fd", type=int, default=None)
    parser.add_argument("--log-level", default=None)
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("pool")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)

    def report(message: dict[str, object]) -> None:
        if args.ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, json.dumps(message).encode() + b"\n")
            os.close(args.ready_fd)
        args.ready_fd = None

    try:
        options = parse_options(args.options)
        if args.log_level:
            options.log_level = _log_level(args.log_level)
        return serve(Path(args.pool), Path(args.mountpoint), options, foreground=False,
                     ready=lambda: report({"ready": True, "pid": os.getpid()}))
    except DynamicFSError as exc:
        error("mount failed", reason=str(exc))
        report({"error": str(exc), "exit_code": exc.exit_code})
        return exc.exit_code
    except BaseException as exc:
        error(CRASH_EVENT, pid=os.getpid(), reason=repr(exc))
        report({"error": f"the mount daemon crashed: {exc!r}; see the pool's log",
                "exit_code": 70})
        raise


if __name__ == "__main__":
    sys.exit(main())
