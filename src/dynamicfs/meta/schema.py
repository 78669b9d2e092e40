"""The metadata schema and its versioned migrations.

`PRAGMA user_version` holds the schema version; MIGRATIONS[i] takes a database from
version i to i+1. The pool's on-disk format version (FORMAT_VERSION) is stored in the
`pool` row; a pool newer than this code is refused. docs/FORMAT.md mirrors this file.
"""

from __future__ import annotations

FORMAT_VERSION = 2
# file_extents.extent_id of a chunk whose write-back failed: no extent has this id, and
# the chunk reads as an I/O error (not as zeros, nor as what it held before) until it is
# overwritten whole or truncated away.
LOST_EXTENT = 0

_V1 = """
CREATE TABLE pool (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    uuid            TEXT    NOT NULL,
    format_version  INTEGER NOT NULL,
    extent_size     INTEGER NOT NULL,
    default_policy  TEXT    NOT NULL,
    codec           TEXT    NOT NULL,
    created         REAL    NOT NULL,
    epoch           INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE disks (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid            TEXT    NOT NULL UNIQUE,
    path            TEXT    NOT NULL UNIQUE,
    tier            TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    reason          TEXT    NOT NULL DEFAULT '',
    capacity        INTEGER,
    used            INTEGER NOT NULL DEFAULT 0,
    read_errors     INTEGER NOT NULL DEFAULT 0,
    write_errors    INTEGER NOT NULL DEFAULT 0,
    checksum_errors INTEGER NOT NULL DEFAULT 0,
    added           REAL    NOT NULL
);
CREATE TABLE inodes (
    ino       INTEGER PRIMARY KEY AUTOINCREMENT,
    mode      INTEGER NOT NULL,
    uid       INTEGER NOT NULL,
    gid       INTEGER NOT NULL,
    nlink     INTEGER NOT NULL,
    size      INTEGER NOT NULL DEFAULT 0,
    rdev      INTEGER NOT NULL DEFAULT 0,
    atime_ns  INTEGER NOT NULL,
    mtime_ns  INTEGER NOT NULL,
    ctime_ns  INTEGER NOT NULL,
    policy    TEXT,
    target    BLOB
);
CREATE TABLE dentries (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    parent  INTEGER NOT NULL,
    name    BLOB    NOT NULL,
    ino     INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_ino ON dentries (ino);
CREATE TABLE xattrs (
    ino    INTEGER NOT NULL,
    name   BLOB    NOT NULL,
    value  BLOB    NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE TABLE extents (
    id        INTEGER PRIMARY KEY,
    length    INTEGER NOT NULL,
    checksum  BLOB    NOT NULL,
    policy    TEXT    NOT NULL,
    created   REAL    NOT NULL
);
CREATE TABLE fragments (
    id         INTEGER PRIMARY KEY,
    extent_id  INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    disk_id    INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    checksum   BLOB    NOT NULL,
    UNIQUE (extent_id, idx),
    UNIQUE (extent_id, disk_id)
);
CREATE INDEX fragments_disk ON fragments (disk_id);
CREATE TABLE file_extents (
    ino        INTEGER NOT NULL,
    chunk      INTEGER NOT NULL,
    extent_id  INTEGER NOT NULL,
    PRIMARY KEY (ino, chunk)
) WITHOUT ROWID;
CREATE INDEX file_extents_extent ON file_extents (extent_id);
CREATE TABLE repair_queue (
    extent_id  INTEGER PRIMARY KEY,
    reason     TEXT    NOT NULL,
    queued     REAL    NOT NULL
);
CREATE TABLE events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    time    REAL    NOT NULL,
    kind    TEXT    NOT NULL,
    detail  TEXT    NOT NULL
);
"""

# Version 2: integrity tools. Where a scrub stands (so an interrupted scrub resumes),
# the problem extents it found, and the generation of the last metadata copy.
_V2 = """
CREATE TABLE scrub_state (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    started          REAL    NOT NULL,
    position         INTEGER NOT NULL DEFAULT 0,
    finished         REAL,
    repair           INTEGER NOT NULL DEFAULT 0,
    elapsed          REAL    NOT NULL DEFAULT 0,
    checked          INTEGER NOT NULL DEFAULT 0,
    bytes            INTEGER NOT NULL DEFAULT 0,
    fragment_bytes   INTEGER NOT NULL DEFAULT 0,
    healthy          INTEGER NOT NULL DEFAULT 0,
    under_redundant  INTEGER NOT NULL DEFAULT 0,
    repaired         INTEGER NOT NULL DEFAULT 0,
    unreadable       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE scrub_problems (
    extent_id  INTEGER PRIMARY KEY,
    state      TEXT    NOT NULL,
    detail     TEXT    NOT NULL,
    found      REAL    NOT NULL
);
CREATE TABLE metadata_copies (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  INTEGER NOT NULL,
    copied      REAL    NOT NULL,
    disks       TEXT    NOT NULL
);
"""

# Version 3: background scrub. The schedule it follows, and where its cursor stands:
# it checks extents in id order, so resuming from `position` checks first what was
# verified longest ago (new extents come last: they were checked as they were written).
_V3 = """
CREATE TABLE scrub_schedule (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    frequency   TEXT    NOT NULL,
    intensity   TEXT    NOT NULL,
    hour        INTEGER NOT NULL DEFAULT 2,
    updated     REAL    NOT NULL
);
CREATE TABLE background_scrub (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    mode                TEXT    NOT NULL,
    intensity           TEXT    NOT NULL,
    position            INTEGER NOT NULL DEFAULT 0,
    pass_started        REAL,
    pass_checked        INTEGER NOT NULL DEFAULT 0,
    pass_bytes          INTEGER NOT NULL DEFAULT 0,
    pass_problems       INTEGER NOT NULL DEFAULT 0,
    pass_repaired       INTEGER NOT NULL DEFAULT 0,
    last_pass_started   REAL,
    last_pass_finished  REAL,
    last_pass_checked   INTEGER NOT NULL DEFAULT 0,
    last_pass_problems  INTEGER NOT NULL DEFAULT 0,
    passes              INTEGER NOT NULL DEFAULT 0,
    updated             REAL    NOT NULL
);
"""

# Version 4 (format 2): fragments are records of segment files. A fragment row says
# where: `segment` (the segment file's number) and `offset` (its first byte there).
# Rows of older pools keep segment NULL: their fragments are files of their own.
_V4 = """
ALTER TABLE fragments ADD COLUMN segment INTEGER;
ALTER TABLE fragments ADD COLUMN offset INTEGER NOT NULL DEFAULT 0;
CREATE INDEX fragments_segment ON fragments (disk_id, segment);
UPDATE pool SET format_version = 2;
"""

MIGRATIONS: list[str] = [_V1, _V2, _V3, _V4]
SCHEMA_VERSION = len(MIGRATIONS)
