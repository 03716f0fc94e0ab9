"""Who is asking: a login session for pages, HTTP Basic (or the session) for `/api/`, and the
CSRF token every form and session-authenticated API call must carry."""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets

from starlette.requests import Request

from .users import User, UsersFile

SESSION_USER = "user"
SESSION_CSRF = "csrf"
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


def session_user(request: Request, users: UsersFile) -> User | None:
    """The logged-in user, with the role the users file gives now (a removed user, or one
    whose role changed, is seen as such at the next request)."""
    name = request.session.get(SESSION_USER)
    if not isinstance(name, str):
        return None
    return users.lookup(name)


def basic_user(request: Request, users: UsersFile) -> User | bool | None:
    """The user of an `Authorization: Basic` header; None when absent, False when wrong."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        name, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    if not sep:
        return False
    return users.check(name, password) or False
