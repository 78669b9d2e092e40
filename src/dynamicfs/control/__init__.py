"""Control layer: the unix socket through which admin commands reach the mount daemon."""
