"""DynamicFS: a pool of unequal disks as one checksummed, self-healing POSIX filesystem."""

__version__ = "0.1.0"
