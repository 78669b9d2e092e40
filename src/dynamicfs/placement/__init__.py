"""Placement layer: which disks get which fragments."""
