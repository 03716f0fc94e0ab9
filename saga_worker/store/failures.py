"""Database failures as one line an operator can act on, never a driver traceback.

Whoever talks to the saga database on an operator's behalf (the client behind the CLI, the
audit archive) wraps each access in `database_errors(safe_url)`: a driver error becomes a
`DatabaseUnavailable` naming the database with its password masked and, when the tables are
missing, the command that creates them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from ..errors import DatabaseUnavailable


def masked_url(url: str) -> str:
    """A database URL with its password masked, for messages."""
    return make_url(url).render_as_string(hide_password=True)


@contextmanager
def database_errors(safe_url: str) -> Iterator[None]:
    """Turn driver errors inside the block into `DatabaseUnavailable` naming `safe_url`."""
    try:
        yield
    except ProgrammingError as exc:
        raise DatabaseUnavailable(
            f"the database at {safe_url} is not usable: {first_line(exc)} "
            "(run `saga-worker db upgrade` to create the tables)"
        ) from None
    except (OperationalError, DBAPIError) as exc:
        text = first_line(exc)
        if "no such table" in text:
            raise DatabaseUnavailable(
                f"the database at {safe_url} has no saga tables (run `saga-worker db upgrade`)"
            ) from None
        raise DatabaseUnavailable(f"cannot reach the database at {safe_url}: {text}") from None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error (of the driver's, when SQLAlchemy wraps one)."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__
