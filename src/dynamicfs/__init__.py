"""DynamicFS: a pool of unequal disks as one checksummed, self-healing POSIX filesystem."""

from dynamicfs.memory import tune_malloc

__version__ = "0.1.0"

tune_malloc()
