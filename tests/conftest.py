"""Fixtures shared by the whole test suite, and the rule that FUSE tests must run in CI.

Tests that mount a filesystem carry `@pytest.mark.fuse` and request `fuse_available`,
which skips them on a machine without FUSE. When the environment variable CI is set,
such a skip is not acceptable: the run fails and names the skipped tests, so a CI
machine that lost FUSE cannot pass by quietly testing less.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator
from pathlib import Path

import pytest
from hypothesis import settings

# Shared CI machines are slow and noisy; a per-example deadline only produces flakes.
settings.register_profile("dynamicfs", deadline=None, print_blob=True)
settings.load_profile("dynamicfs")

_skipped_fuse_tests = pytest.StashKey[list[str]]()


def fuse_missing_reason() -> str | None:
    """Why FUSE filesystems cannot be mounted here, or None if they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (load the fuse module or run the container with it)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not on PATH (install the fuse3 package: ./scripts/setup)"
    return None


@pytest.fixture
def fuse_available() -> None:
    """Skip the test unless FUSE filesystems can be mounted on this machine."""
    reason = fuse_missing_reason()
    if reason is not None:
        pytest.skip(f"FUSE unavailable: {reason}")


@pytest.fixture
def tmp_disks(tmp_path: Path) -> Callable[[int], list[Path]]:
    """A factory: tmp_disks(n) makes n more empty directories tmp_path/disk{i}."""
    made: list[Path] = []

    def make(n: int) -> list[Path]:
        new = [tmp_path / f"disk{len(made) + i}" for i in range(n)]
        for path in new:
            path.mkdir()
        made.extend(new)
        return new

    return make


def _needs_fuse(item: pytest.Item) -> bool:
    return item.get_closest_marker("fuse") is not None or "fuse_available" in getattr(
        item, "fixturenames", ()
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_skipped_fuse_tests] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and _needs_fuse(item):
        item.config.stash[_skipped_fuse_tests].append(item.nodeid)
    return report


def _ci() -> bool:
    return bool(os.environ.get("CI"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci() and session.config.stash[_skipped_fuse_tests] and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.config.stash[_skipped_fuse_tests]
    if not (_ci() and skipped):
        return
    terminalreporter.section("FUSE tests skipped in CI", sep="=", red=True, bold=True)
    for nodeid in skipped:
        terminalreporter.line(nodeid)
    terminalreporter.line(
        f"{len(skipped)} FUSE test(s) skipped while CI is set: this run counts as failed. "
        "Make /dev/fuse and fusermount3 available (./scripts/setup installs fuse3).",
        red=True,
    )
