"""Admin layer: one function per operation, used offline and inside the mount daemon.

Nothing here prints: each operation returns data (dataclasses / dicts) that the CLI
renders as tables or JSON.
"""
