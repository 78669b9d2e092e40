"""Namespace layer: POSIX semantics over the extent store, with no knowledge of FUSE."""
