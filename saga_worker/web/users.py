"""The console's users file (`SAGA_WEB_USERS_FILE`): names, roles and salted scrypt hashes.

Only hashes are stored (scrypt, RFC 7914, from the standard library: a slow, memory-hard
key derivation), one fresh 16-byte salt each; a check compares in constant time and costs
the same for an unknown name, so timing does not tell which names exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigurationError

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")
#: A user name: it becomes the `user_id` of the audit rows of that user's actions.
NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
# scrypt cost: 2**15 x 8 x 1 takes about 32 MiB and tens of milliseconds per check.
_N, _R, _P = 2**15, 8, 1
_MAXMEM = 64 * 1024 * 1024


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    #: Changes with the user's password hash: a session remembers it, and a password reset
    #: (or a remove and re-add) ends the sessions opened before it.
    stamp: str = field(default="", compare=False)

    @property
    def can_act(self) -> bool:
        """Operators retry, abort, vote and migrate; viewers only read."""
        return self.role == "operator"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash`, base64 (no padding) for salt and hash."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest + "==")
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt + "=="),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def _stamp(stored: str) -> str:
    """A short digest of a stored hash (not the hash: the session cookie is readable)."""
    return hashlib.sha256(b"saga console session\0" + stored.encode()).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


#: Compared against when a name is unknown, so that the check takes as long as for a user.
_DUMMY = hash_password("no such user", salt=b"\0" * 16)


class UsersFile:
    """The users file: read at each check (an added user can log in at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"SAGA_WEB_USERS_FILE {self.path} cannot be read as the console's users file "
                f"({type(exc).__name__}); recreate it with `saga-worker web add-user`"
            ) from None
        users = data.get("users") if isinstance(data, dict) else None
        return users if isinstance(users, dict) else {}

    def check(self, name: str, password: str) -> User | None:
        """The user when `password` is theirs, else None (same cost either way)."""
        entry = self._load().get(name) if NAME_RE.fullmatch(name or "") else None
        stored = entry.get("hash", "") if isinstance(entry, dict) else ""
        ok = password_matches(password[:MAX_PASSWORD], stored or _DUMMY)
        role = entry.get("role") if isinstance(entry, dict) else None
        if not ok or not stored or role not in ROLES:
            return None
        return User(name, role, _stamp(stored))

    def lookup(self, name: str) -> User | None:
        """The user of that name as the file says now (no password check: for sessions)."""
        entry = self._load().get(name)
        role = entry.get("role") if isinstance(entry, dict) else None
        stored = entry.get("hash", "") if isinstance(entry, dict) else ""
        return User(name, role, _stamp(str(stored))) if role in ROLES else None

    def add(self, name: str, role: str, password: str) -> bool:
        """Add or replace a user; True when the name was new. The file is written 0600."""
        if not NAME_RE.fullmatch(name):
            raise ConfigurationError(f"user name {name!r} must match {NAME_RE.pattern}")
        if role not in ROLES:
            raise ConfigurationError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise ConfigurationError(
                f"the password must be {MIN_PASSWORD}-{MAX_PASSWORD} characters long"
            )
        users = self._load()
        new = name not in users
        users[name] = {"role": role, "hash": hash_password(password)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump({"users": users}, out, indent=2, sort_keys=True)
        os.replace(tmp, self.path)
        return new
