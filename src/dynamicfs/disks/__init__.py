"""Disks layer: where fragments live. Directory disks now, block devices later."""
