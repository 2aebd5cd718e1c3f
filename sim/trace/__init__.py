"""Traces: the format (read, write, validate), import of external logs, synthetic traces, statistics."""
