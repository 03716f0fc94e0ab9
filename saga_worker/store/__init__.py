"""SQLAlchemy persistence: tables, the row <-> saga codec, and the repository."""

from .connect import create_db_engine
from .repository import SagaStore

__all__ = ["SagaStore", "create_db_engine"]
