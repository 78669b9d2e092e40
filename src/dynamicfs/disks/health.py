"""Disk health states and what each one allows.

healthy   read and write
suspect   read; no new fragments; watched
degraded  read-only until repaired
draining  being emptied; read; no new fragments
failed    neither read nor written
"""

from __future__ import annotations

HEALTHY = "healthy"
SUSPECT = "suspect"
DEGRADED = "degraded"
DRAINING = "draining"
FAILED = "failed"

STATES = (HEALTHY, SUSPECT, DEGRADED, DRAINING, FAILED)
READABLE = frozenset({HEALTHY, SUSPECT, DEGRADED, DRAINING})
WRITABLE = frozenset({HEALTHY})
# Fragments on these disks still count toward an extent's redundancy.
COUNTS_FOR_REDUNDANCY = frozenset({HEALTHY, SUSPECT, DEGRADED})
