"""A seeded file workload for crash tests: run it in a mount, kill the mount at any moment.

    python tests/crashload.py DIR JOURNAL --seed N [--ops N]

In DIR (created; meant to be inside a DynamicFS mount) it creates, overwrites, appends
to, truncates, renames and unlinks scratch files, some in subdirectories with an
erasure-coded policy, and now and then seals one: it writes the file's last bytes,
fsyncs it, renames it to a fresh name `k<n>` (never used before nor after), fsyncs the
directory, and only then appends a line to JOURNAL (outside the mount, fsynced):

    {"op": "+", "path": "d1/k7", "size": 12345, "blake2b": "..."}

A sealed file is never written again, so after a crash its content must be exactly
the journalled one. Sometimes a sealed file is retired: the workload journals
{"op": "?", ...} (it may be gone or still whole from here on), unlinks it, fsyncs the
directory and journals {"op": "-", ...} (it must be gone). Sometimes one is replaced
the way editors and config writers do it: the workload journals {"op": "~", "size",
"blake2b"} (the old content or this new one, whole, from here on), writes the new
content to `<path>.new` and closes it without fsync, renames it over the path, fsyncs
the directory and journals {"op": "+", ...} with the new content. `expected(journal)`
turns a journal into what must hold, path by path; a torn last line is ignored.

The workload stops at the first error (the mount went away) or after --ops operations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

POLICY_XATTR = "user.dynamicfs.policy"
# Subdirectories and their policies; "" is DIR itself (the pool's default policy).
SUBDIRS = {"": None, "d1": "ec:4+2", "d2": "replicate:2"}
MAX_SCRATCH = 10
MAX_SEALED = 24


def digest(data: bytes) -> str:
    return hashlib.blake2b(data).hexdigest()


@dataclass(frozen=True)
class Expected:
    """What must hold for one sealed path after a crash."""

    path: str
    size: int
    blake2b: str
    may_be_gone: bool = False
    gone: bool = False
    instead: tuple[int, str] | None = None  # (size, blake2b) it may hold instead


def expected(journal: Path) -> dict[str, Expected]:
    """The last word of the journal on each path."""
    out: dict[str, Expected] = {}
    try:
        text = journal.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # torn by the kill
        entry = json.loads(line)
        path = entry["path"]
        if entry["op"] == "+":
            out[path] = Expected(path, entry["size"], entry["blake2b"])
        elif entry["op"] == "?":
            out[path] = Expected(path, out[path].size, out[path].blake2b, may_be_gone=True)
        elif entry["op"] == "~":
            out[path] = Expected(path, out[path].size, out[path].blake2b,
                                 instead=(entry["size"], entry["blake2b"]))
        else:
            out[path] = Expected(path, 0, "", gone=True)
    return out


class Workload:
    def __init__(self, root: Path, journal: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.journal = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.scratch: dict[str, bytearray] = {}  # relative path -> content
        self.sealed: list[str] = []
        self.next_name = 0

    # -- helpers ----------------------------------------------------------------
    def data(self) -> bytes:
        r = self.rng.random()
        if r < 0.4:
            n = self.rng.randrange(0, 8192)
        elif r < 0.85:
            n = self.rng.randrange(8192, 128 * 1024)
        else:
            n = self.rng.randrange(128 * 1024, 1200 * 1024)
        return self.rng.randbytes(n)

    def fresh(self, prefix: str) -> str:
        self.next_name += 1
        sub = self.rng.choice(list(SUBDIRS))
        return f"{sub}/{prefix}{self.next_name}" if sub else f"{prefix}{self.next_name}"

    def note(self, entry: dict[str, object]) -> None:
        os.write(self.journal, json.dumps(entry).encode() + b"\n")
        os.fsync(self.journal)

    def fsync_dir(self, rel: str) -> None:
        fd = os.open(self.root / os.path.dirname(rel), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def pick(self) -> str:
        return self.rng.choice(sorted(self.scratch))

    # -- operations ---------------------------------------------------------------
    def create(self) -> None:
        rel = self.fresh("s")
        data = self.data()
        with open(self.root / rel, "wb") as f:
            f.write(data)
        self.scratch[rel] = bytearray(data)

    def overwrite(self) -> None:
        rel = self.pick()
        content = self.scratch[rel]
        data = self.data()[: 256 * 1024]
        offset = self.rng.randrange(0, len(content) + 64 * 1024)
        with open(self.root / rel, "r+b") as f:
            f.seek(offset)
            f.write(data)
        if offset > len(content):
            content.extend(bytes(offset - len(content)))
        content[offset: offset + len(data)] = data

    def append(self) -> None:
        rel = self.pick()
        data = self.data()
        with open(self.root / rel, "ab") as f:
            f.write(data)
        self.scratch[rel].extend(data)

    def truncate(self) -> None:
        rel = self.pick()
        content = self.scratch[rel]
        size = self.rng.randrange(0, len(content) + 300 * 1024)
        os.truncate(self.root / rel, size)
        if size < len(content):
            del content[size:]
        else:
            content.extend(bytes(size - len(content)))

    def rename(self) -> None:
        rel = self.pick()
        if len(self.scratch) > 1 and self.rng.random() < 0.3:
            target = self.rng.choice([p for p in self.scratch if p != rel])  # replaces it
        else:
            target = self.fresh("s")
        os.rename(self.root / rel, self.root / target)
        self.scratch[target] = self.scratch.pop(rel)

    def unlink(self) -> None:
        rel = self.pick()
        os.unlink(self.root / rel)
        del self.scratch[rel]

    def seal(self) -> None:
        rel = self.pick()
        content = self.scratch.pop(rel)
        with open(self.root / rel, "r+b") as f:
            if self.rng.random() < 0.5:
                tail = self.data()[: 64 * 1024]
                f.seek(len(content))
                f.write(tail)
                content.extend(tail)
            f.flush()
            os.fsync(f.fileno())
        final = f"{os.path.dirname(rel)}/k{self.next_name + 1}".lstrip("/")
        self.next_name += 1
        os.rename(self.root / rel, self.root / final)
        self.fsync_dir(final)
        self.sealed.append(final)
        self.note({"op": "+", "path": final, "size": len(content),
                   "blake2b": digest(bytes(content))})

    def retire(self) -> None:
        rel = self.sealed.pop(self.rng.randrange(len(self.sealed)))
        self.note({"op": "?", "path": rel})
        os.unlink(self.root / rel)
        self.fsync_dir(rel)
        self.note({"op": "-", "path": rel})

    def replace(self) -> None:
        rel = self.rng.choice(self.sealed)
        data = self.data()
        self.note({"op": "~", "path": rel, "size": len(data), "blake2b": digest(data)})
        with open(self.root / f"{rel}.new", "wb") as f:
            f.write(data)
        os.rename(self.root / f"{rel}.new", self.root / rel)
        self.fsync_dir(rel)
        self.note({"op": "+", "path": rel, "size": len(data), "blake2b": digest(data)})

    def step(self) -> None:
        if not self.scratch:
            self.create()
            return
        choices = [(self.create, 3 if len(self.scratch) < MAX_SCRATCH else 0),
                   (self.overwrite, 3), (self.append, 2), (self.truncate, 1),
                   (self.rename, 1), (self.unlink, 1), (self.seal, 3),
                   (self.replace, 1 if self.sealed else 0),
                   (self.retire, 2 if len(self.sealed) > MAX_SEALED else 0)]
        ops, weights = zip(*choices, strict=True)
        self.rng.choices(ops, weights)[0]()

    def run(self, ops: int | None) -> None:
        for sub, policy in SUBDIRS.items():
            if sub:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
                if policy:
                    os.setxattr(self.root / sub, POLICY_XATTR, policy.encode())
            else:
                self.root.mkdir(parents=True, exist_ok=True)
        done = 0
        while ops is None or done < ops:
            self.step()
            done += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("journal", type=Path)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--ops", type=int, default=None, help="stop after this many operations")
    args = parser.parse_args(argv)
    try:
        Workload(args.dir, args.journal, args.seed).run(args.ops)
    except OSError:
        traceback.print_exc()  # the test shows it if the mount was not killed yet
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
