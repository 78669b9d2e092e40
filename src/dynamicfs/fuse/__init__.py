"""FUSE layer: the kernel connection (session.py: /dev/fuse, the mount, the worker
threads; protocol.py: the wire format), the adapter (FUSE requests -> namespace calls,
errno mapping) and the mount daemon that owns a pool while it is mounted."""
