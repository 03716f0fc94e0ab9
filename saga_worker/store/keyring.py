"""Which signing key a process uses, checked against the one its database was set up with.

The key comes from SAGA_SIGNING_KEY or SAGA_SIGNING_KEY_FILE and is required with
PostgreSQL; the database keeps only its fingerprint (`keys.fingerprint`), written by the
first process that uses it, and every later process must hold the same key. Only the
embedded SQLite default, a single-host set-up, creates a key by itself (kept in its own
database file).
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import delete, insert, select

from ..config import Settings
from ..errors import ConfigurationError
from ..keys import fingerprint
from .repository import SagaStore
from .tables import settings_table

#: saga_settings row holding the fingerprint of the database's signing key.
FINGERPRINT = "signing_key_fingerprint"
#: saga_settings row where saga_worker 0.1 and 0.2 (and the embedded default) keep the key.
STORED_KEY = "signing_key"

MAKE_ONE = "python3 -c 'import secrets; print(secrets.token_hex(32))' > saga_signing_key"


class SigningKeyMismatch(ConfigurationError):
    """This process's signing key is not the one the database was set up with."""

    code = "signing_key_mismatch"


def signing_key_for(settings: Settings, store: SagaStore) -> str:
    """The signing key this process must use with `store`'s database, or ConfigurationError."""
    key = settings.signing_key
    embedded = store.engine.dialect.name == "sqlite"
    if key is None:
        if embedded:
            return store.add_setting(STORED_KEY, os.urandom(32).hex())
        stored = store.setting(STORED_KEY)
        hint = (
            " This database still holds the key an earlier saga_worker generated: move it out "
            "with `saga-worker db move-key FILE` as the tables' owner, then set "
            "SAGA_SIGNING_KEY_FILE=FILE for every worker, beat and CLI."
            if stored is not None
            else f" Make one ({MAKE_ONE}) and give every worker, beat and CLI of this database "
            "SAGA_SIGNING_KEY_FILE pointing at it (or SAGA_SIGNING_KEY)."
        )
        raise ConfigurationError(
            "SAGA_SIGNING_KEY or SAGA_SIGNING_KEY_FILE is required with PostgreSQL." + hint
        )
    stored = store.setting(STORED_KEY)
    if stored is not None and stored != key:
        raise SigningKeyMismatch(
            "SAGA_SIGNING_KEY is not the key this database holds in saga_settings (written by "
            "an earlier saga_worker or the embedded default): use that key, or move it out "
            "with `saga-worker db move-key FILE` and use the file"
        )
    expected = store.add_setting(FINGERPRINT, fingerprint(key))
    if expected != fingerprint(key):
        raise SigningKeyMismatch(
            f"SAGA_SIGNING_KEY does not match the key this database was set up with "
            f"(fingerprint {expected[:12]}..., this process has {fingerprint(key)[:12]}...): "
            "every worker, beat and CLI of one database must use the same key; messages "
            "signed with another one are refused"
        )
    return key


def move_stored_key(store: SagaStore, path: Path) -> str:
    """Write the key saga_settings holds to `path` (mode 600), keep its fingerprint, and
    delete it from the database; returns the fingerprint. The tables' owner runs this.

    The key row is deleted in the same transaction that then writes the file: a role that may
    not delete it (the run-time role) fails before any file exists, and a file that cannot be
    written leaves the database as it was.
    """
    if path.exists():
        raise ConfigurationError(f"{path} exists already; choose a new file")
    with store.engine.begin() as conn:
        key = conn.execute(
            select(settings_table.c.value).where(settings_table.c.key == STORED_KEY)
        ).scalar()
        if key is None:
            raise ConfigurationError(
                "this database holds no signing key in saga_settings: there is nothing to move"
            )
        key = str(key)
        stored = conn.execute(
            select(settings_table.c.value).where(settings_table.c.key == FINGERPRINT)
        ).scalar()
        if stored is not None and stored != fingerprint(key):
            raise SigningKeyMismatch(
                "the stored key does not match the fingerprint this database keeps; nothing moved"
            )
        if stored is None:
            conn.execute(insert(settings_table).values(key=FINGERPRINT, value=fingerprint(key)))
        conn.execute(delete(settings_table).where(settings_table.c.key == STORED_KEY))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(f"{path} exists already; choose a new file") from None
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(key + "\n")
    return fingerprint(key)
