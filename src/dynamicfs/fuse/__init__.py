"""FUSE layer: the pyfuse3 adapter (FUSE requests -> namespace calls, errno mapping) and
the mount daemon that owns a pool while it is mounted."""
