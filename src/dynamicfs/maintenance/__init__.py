"""Maintenance layer: scrub, repair/rebuild, drain, garbage collection."""
