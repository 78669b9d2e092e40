"""Metadata layer: the SQLite schema, its migrations and the transaction discipline."""
