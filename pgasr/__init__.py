"""PGASR."""
