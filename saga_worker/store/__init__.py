"""SQLAlchemy persistence: tables, the row <-> saga codec, and the repository."""

from .repository import SagaStore, create_db_engine

__all__ = ["SagaStore", "create_db_engine"]
