"""CLI layer: argument parsing, tables, progress bars, JSON output. Calls admin operations."""
