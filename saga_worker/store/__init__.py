"""Persistence: tables, the row <-> saga codec, the one write path and the repository.

Nothing is imported here, so that `store.port` (what the engine needs) stays free of
SQLAlchemy.
"""
