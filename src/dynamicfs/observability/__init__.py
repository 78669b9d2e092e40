"""Observability layer: JSON logs, the audit trail and (later) metrics."""
