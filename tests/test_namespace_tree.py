"""The namespace's tree: directories, renames, link counts, symlinks, xattrs, readdir
offsets and redundancy policies set through `user.dynamicfs.policy`."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynamicfs.errors import FsError
from dynamicfs.namespace.fs import Namespace
from dynamicfs.namespace.types import (
    LAYOUT_XATTR,
    POLICY_XATTR,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
)
from test_engine_support import KiB, PoolMaker, count

E = 64 * KiB
ROOT = ROOT_INO


class Tree:
    """A namespace over a 6-disk pool, with shorthands that name things by path."""

    def __init__(self, maker: PoolMaker) -> None:
        self.maker = maker
        self.pool = maker(6, extent_size=E)
        self.ns = Namespace(self.pool, commit_interval=3600)

    def remount(self) -> None:
        self.ns.close()
        self.pool = self.maker.reopen(self.pool)
        self.ns = Namespace(self.pool, commit_interval=3600)

    def ino(self, path: str) -> int:
        ino = ROOT
        for part in filter(None, path.split("/")):
            ino = self.ns.lookup(ino, part.encode()).ino
        return ino

    def split(self, path: str) -> tuple[int, bytes]:
        parent, _, name = path.rpartition("/")
        return self.ino(parent), name.encode()

    def mkdir(self, path: str) -> int:
        return self.ns.mkdir(*self.split(path), 0o755, 0, 0).ino

    def file(self, path: str, data: bytes = b"") -> int:
        ino = self.ns.create(*self.split(path), 0o644, 0, 0).ino
        if data:
            self.ns.write(ino, 0, data)
        self.ns.release(ino)
        return ino

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self.ns.rename(*self.split(old), *self.split(new), flags)

    def names(self, path: str) -> list[bytes]:
        return sorted(e.name for e in self.ns.readdir(self.ino(path)))

    def nlink(self, path: str) -> int:
        return self.ns.getattr(self.ino(path)).nlink

    def exists(self, path: str) -> bool:
        try:
            self.ino(path)
        except FsError:
            return False
        return True


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    with PoolMaker(tmp_path) as maker:
        t = Tree(maker)
        yield t
        t.ns.close()


def fails(code: int, call: Callable[[], object]) -> None:
    with pytest.raises(FsError) as failure:
        call()
    assert failure.value.errno == code, errno.errorcode.get(failure.value.errno or 0)


# -- directories -----------------------------------------------------------------------------
def test_rmdir_removes_only_empty_directories(tree: Tree) -> None:
    tree.mkdir("/d")
    tree.file("/d/f")
    fails(errno.ENOTEMPTY, lambda: tree.ns.rmdir(ROOT, b"d"))
    fails(errno.ENOTDIR, lambda: tree.ns.rmdir(tree.ino("/d"), b"f"))
    fails(errno.EISDIR, lambda: tree.ns.unlink(ROOT, b"d"))
    tree.ns.unlink(tree.ino("/d"), b"f")
    tree.ns.rmdir(ROOT, b"d")
    assert tree.names("/") == []
    fails(errno.ENOENT, lambda: tree.ns.rmdir(ROOT, b"d"))


def test_names_are_checked(tree: Tree) -> None:
    tree.mkdir("/d")
    fails(errno.EEXIST, lambda: tree.mkdir("/d"))
    fails(errno.EEXIST, lambda: tree.file("/d"))
    fails(errno.ENAMETOOLONG, lambda: tree.ns.mkdir(ROOT, b"x" * 256, 0o755, 0, 0))
    fails(errno.EINVAL, lambda: tree.ns.mkdir(ROOT, b"a/b", 0o755, 0, 0))
    fails(errno.ENOTDIR, lambda: tree.ns.mkdir(tree.file("/f"), b"x", 0o755, 0, 0))
    tree.ns.mkdir(ROOT, b"x" * 255, 0o755, 0, 0)


def test_directory_link_counts_follow_subdirectories(tree: Tree) -> None:
    assert tree.nlink("/") == 2
    tree.mkdir("/a")
    tree.mkdir("/b")
    tree.mkdir("/a/c")
    tree.file("/a/f")
    assert (tree.nlink("/"), tree.nlink("/a"), tree.nlink("/b"), tree.nlink("/a/c")) == (4, 3, 2, 2)
    tree.rename("/a/c", "/b/c")
    assert (tree.nlink("/a"), tree.nlink("/b")) == (2, 3)
    tree.ns.rmdir(tree.ino("/b"), b"c")
    assert tree.nlink("/b") == 2
    tree.remount()
    assert (tree.nlink("/"), tree.nlink("/a"), tree.nlink("/b")) == (4, 2, 2)


def test_file_link_counts_follow_hard_links(tree: Tree) -> None:
    ino = tree.file("/f", b"data")
    tree.mkdir("/d")
    tree.ns.link(ino, tree.ino("/d"), b"g")
    tree.ns.link(ino, ROOT, b"h")
    assert tree.nlink("/f") == 3
    fails(errno.EPERM, lambda: tree.ns.link(tree.ino("/d"), ROOT, b"dirlink"))
    fails(errno.EEXIST, lambda: tree.ns.link(ino, ROOT, b"h"))
    tree.ns.unlink(ROOT, b"f")
    tree.ns.unlink(ROOT, b"h")
    assert tree.nlink("/d/g") == 1
    assert tree.ns.read(tree.ino("/d/g"), 0, 10) == b"data"


# -- rename ---------------------------------------------------------------------------------
def test_rename_over_a_file_replaces_it_and_frees_its_data(tree: Tree) -> None:
    src = tree.file("/a", b"A" * E)
    tree.file("/b", b"B" * (2 * E))
    tree.ns.sync_all()
    assert count(tree.pool, "extents") == 3
    tree.rename("/a", "/b")
    assert tree.names("/") == [b"b"]
    assert tree.ino("/b") == src
    assert tree.ns.read(src, 0, 4 * E) == b"A" * E
    tree.ns.sync_all()
    assert count(tree.pool, "extents") == 1


def test_rename_of_directories(tree: Tree) -> None:
    tree.mkdir("/d")
    tree.file("/d/f")
    tree.mkdir("/empty")
    tree.mkdir("/full")
    tree.file("/full/x")
    tree.file("/file")
    fails(errno.ENOTEMPTY, lambda: tree.rename("/d", "/full"))
    fails(errno.ENOTDIR, lambda: tree.rename("/d", "/file"))
    fails(errno.EISDIR, lambda: tree.rename("/file", "/empty"))
    tree.mkdir("/d/sub")
    fails(errno.EINVAL, lambda: tree.rename("/d", "/d/sub/inside"))
    fails(errno.EINVAL, lambda: tree.rename("/d", "/d/inside"))
    tree.rename("/d", "/empty")  # over an empty directory
    assert tree.names("/") == [b"empty", b"file", b"full"]
    assert tree.names("/empty") == [b"f", b"sub"]
    assert tree.nlink("/") == 4


def test_rename_noreplace_refuses_an_existing_target(tree: Tree) -> None:
    tree.file("/a", b"a")
    tree.file("/b", b"b")
    fails(errno.EEXIST, lambda: tree.rename("/a", "/b", RENAME_NOREPLACE))
    assert tree.ns.read(tree.ino("/b"), 0, 9) == b"b"
    tree.rename("/a", "/c", RENAME_NOREPLACE)
    assert tree.names("/") == [b"b", b"c"]
    fails(errno.EINVAL, lambda: tree.rename("/b", "/c", RENAME_NOREPLACE | RENAME_EXCHANGE))


def test_rename_exchange_swaps_two_entries(tree: Tree) -> None:
    tree.mkdir("/p")
    tree.mkdir("/q")
    f = tree.file("/p/x", b"file")
    d = tree.mkdir("/q/y")
    tree.rename("/p/x", "/q/y", RENAME_EXCHANGE)
    assert tree.ino("/p/x") == d and tree.ino("/q/y") == f
    assert (tree.nlink("/p"), tree.nlink("/q")) == (3, 2)
    assert stat.S_ISDIR(tree.ns.getattr(tree.ino("/p/x")).mode)
    fails(errno.ENOENT, lambda: tree.rename("/p/x", "/q/missing", RENAME_EXCHANGE))
    tree.remount()
    assert (tree.nlink("/p"), tree.nlink("/q")) == (3, 2)
    assert tree.ns.read(tree.ino("/q/y"), 0, 10) == b"file"


def test_rename_onto_itself_or_another_link_of_the_same_file_changes_nothing(
        tree: Tree) -> None:
    ino = tree.file("/a", b"x")
    tree.ns.link(ino, ROOT, b"b")
    tree.rename("/a", "/b")
    assert tree.names("/") == [b"a", b"b"]
    assert tree.nlink("/a") == 2


# -- symlinks -----------------------------------------------------------------------------------
def test_symlinks_keep_their_target(tree: Tree) -> None:
    target = b"../some/where/" + b"t" * 200
    attr = tree.ns.symlink(ROOT, b"l", target, 0, 0)
    assert stat.S_ISLNK(attr.mode) and attr.size == len(target)
    assert tree.ns.readlink(attr.ino) == target
    fails(errno.EINVAL, lambda: tree.ns.readlink(tree.file("/f")))
    tree.remount()
    assert tree.ns.readlink(tree.ino("/l")) == target


# -- xattrs ---------------------------------------------------------------------------------------
def test_xattrs_honour_create_and_replace(tree: Tree) -> None:
    ino = tree.file("/f")
    fails(errno.ENODATA, lambda: tree.ns.getxattr(ino, b"user.a"))
    fails(errno.ENODATA, lambda: tree.ns.setxattr(ino, b"user.a", b"1", os.XATTR_REPLACE))
    tree.ns.setxattr(ino, b"user.a", b"1", os.XATTR_CREATE)
    fails(errno.EEXIST, lambda: tree.ns.setxattr(ino, b"user.a", b"2", os.XATTR_CREATE))
    tree.ns.setxattr(ino, b"user.a", b"2", os.XATTR_REPLACE)
    tree.ns.setxattr(ino, b"user.b", b"\x00binary\xff")
    assert tree.ns.getxattr(ino, b"user.a") == b"2"
    assert tree.ns.listxattr(ino) == [b"user.a", b"user.b"]
    tree.ns.removexattr(ino, b"user.a")
    fails(errno.ENODATA, lambda: tree.ns.removexattr(ino, b"user.a"))
    tree.remount()
    assert tree.ns.listxattr(ino) == [b"user.b"]
    assert tree.ns.getxattr(ino, b"user.b") == b"\x00binary\xff"


# -- readdir ------------------------------------------------------------------------------------
def test_readdir_offsets_stay_valid_while_entries_come_and_go(tree: Tree) -> None:
    d = tree.mkdir("/d")
    for i in range(20):
        tree.file(f"/d/f{i:02d}")
    seen: list[bytes] = []
    offset = 0
    removed: set[bytes] = set()
    for step in range(100):
        page = tree.ns.readdir(d, offset, limit=4)
        if not page:
            break
        seen += [e.name for e in page]
        offset = page[-1].next_offset
        # Between pages: drop an entry not yet listed, add a new one.
        victim = f"f{19 - step:02d}".encode()
        if step < 4:
            tree.ns.unlink(d, victim)
            removed.add(victim)
            tree.file(f"/d/new{step}")
    assert len(seen) == len(set(seen))
    stayed = {f"f{i:02d}".encode() for i in range(20)} - removed
    assert stayed <= set(seen)
    assert not removed & set(seen)
    assert {f"new{i}".encode() for i in range(4)} <= set(seen)


# -- policies ------------------------------------------------------------------------------
def test_a_directory_policy_is_inherited_and_used_for_data(tree: Tree) -> None:
    d = tree.mkdir("/d")
    tree.ns.setxattr(d, POLICY_XATTR, b"ec:4+2")
    sub = tree.mkdir("/d/sub")
    # Two chunks, the second of one byte: never zero, or it would be stored as a hole.
    ino = tree.file("/d/sub/f", os.urandom(E) + b"\x01")
    tree.ns.sync_all()
    assert tree.ns.getxattr(sub, POLICY_XATTR) == b"ec:4+2"
    assert tree.ns.getxattr(ino, POLICY_XATTR) == b"ec:4+2"
    layout = tree.ns.getxattr(ino, LAYOUT_XATTR).decode().splitlines()
    assert len(layout) == 2 and all(" ec:4+2 " in line for line in layout)
    assert all(len(line.split(": ")[1].split()) == 6 for line in layout)
    assert tree.ns.getxattr(tree.file("/elsewhere"), POLICY_XATTR) == b"auto"


@pytest.mark.parametrize("bad", [b"ec:9+9", b"replicate:0", b"bogus", b"ec:4+0", b""])
def test_an_invalid_policy_is_refused_and_changes_nothing(tree: Tree, bad: bytes) -> None:
    ino = tree.file("/f")
    tree.ns.setxattr(ino, POLICY_XATTR, b"replicate:2")
    fails(errno.EINVAL, lambda: tree.ns.setxattr(ino, POLICY_XATTR, bad))
    assert tree.ns.getxattr(ino, POLICY_XATTR) == b"replicate:2"


def test_the_layout_xattr_is_read_only_and_removing_the_policy_restores_the_default(
        tree: Tree) -> None:
    ino = tree.file("/f", b"abc")
    fails(errno.EPERM, lambda: tree.ns.setxattr(ino, LAYOUT_XATTR, b"x"))
    tree.ns.setxattr(ino, POLICY_XATTR, b"replicate:3")
    tree.ns.removexattr(ino, POLICY_XATTR)
    assert tree.ns.getxattr(ino, POLICY_XATTR) == b"auto"
