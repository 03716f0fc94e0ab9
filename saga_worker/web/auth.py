"""Who is asking: a login session for pages, HTTP Basic (or the session) for `/api/`, and the
CSRF token every form and session-authenticated API call must carry."""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import threading
import time
from collections import deque

from starlette.requests import Request

from .users import User, UsersFile

SESSION_USER = "user"
SESSION_CSRF = "csrf"
#: The user's password stamp when the session was opened (users.User.stamp).
SESSION_STAMP = "stamp"
#: A random id per login, so that a logout can revoke the cookie it ends.
SESSION_ID = "sid"
#: Basic credentials are at most this long (a 1024-character password, a 64-character name).
MAX_BASIC = 2048
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


def csrf_token(request: Request) -> str:
    """This session's CSRF token (made on first use)."""
    token = request.session.get(SESSION_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session[SESSION_CSRF] = token
    return token


def csrf_ok(request: Request, sent: object) -> bool:
    expected = request.session.get(SESSION_CSRF)
    return (
        isinstance(expected, str)
        and isinstance(sent, str)
        and hmac.compare_digest(expected.encode(), sent.encode())
    )


class Revoked:
    """Session ids ended by a logout, kept as long as their cookie could still be valid."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, sid: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._until = {k: t for k, t in self._until.items() if t > now}
            self._until[sid] = now + self.lifetime

    def __contains__(self, sid: object) -> bool:
        with self._lock:
            return isinstance(sid, str) and self._until.get(sid, 0.0) > time.monotonic()


def start_session(request: Request, user: User) -> None:
    """A new session for `user` (nothing kept from before the login)."""
    request.session.clear()
    request.session[SESSION_USER] = user.name
    request.session[SESSION_STAMP] = user.stamp
    request.session[SESSION_ID] = secrets.token_urlsafe(16)
    csrf_token(request)


def session_user(request: Request, users: UsersFile, revoked: Revoked) -> User | None:
    """The logged-in user, with the role the users file gives now (a removed user, or one
    whose role changed, is seen as such at the next request; one whose password changed, or
    a session ended by a logout, is logged out)."""
    name = request.session.get(SESSION_USER)
    if not isinstance(name, str) or request.session.get(SESSION_ID) in revoked:
        return None
    user = users.lookup(name)
    if user is None or not hmac.compare_digest(
        user.stamp, str(request.session.get(SESSION_STAMP, ""))
    ):
        return None
    return user


class Throttle:
    """Failed logins, per (user name, client address) and per client address: past the
    limit within `window` seconds, further attempts are refused (429) before any password
    is checked. Keyed on the address too, so that nobody elsewhere can lock a user out."""

    def __init__(self, per_name: int = 5, per_address: int = 30, window: float = 300.0) -> None:
        self.per_name = per_name
        self.per_address = per_address
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, request: Request, name: str) -> list[tuple[str, int]]:
        host = request.client.host if request.client else "?"
        return [(f"{name.lower()}@{host}", self.per_name), (host, self.per_address)]

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            times = self._failures[key]
            while times and times[0] <= now - self.window:
                times.popleft()
            if not times:
                del self._failures[key]

    def retry_after(self, request: Request, name: str) -> int:
        """Seconds until another attempt is allowed (0: now)."""
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            for key, limit in self._keys(request, name):
                times = self._failures.get(key)
                while times and times[0] <= now - self.window:
                    times.popleft()
                if times and len(times) >= limit:
                    wait = max(wait, times[-limit] + self.window - now)
        return int(wait) + 1 if wait > 0 else 0

    def failed(self, request: Request, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 10_000:
                self._prune(now)
            for key, _limit in self._keys(request, name):
                self._failures.setdefault(key, deque()).append(now)


def basic_credentials(request: Request) -> tuple[str, str] | bool | None:
    """(name, password) of an `Authorization: Basic` header; None when absent, False when
    malformed. The password is checked by the caller, off the event loop."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    if len(value) > MAX_BASIC:
        return False
    try:
        name, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    if not sep:
        return False
    return name, password
