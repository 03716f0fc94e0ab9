"""HMAC tokens that bind a dispatched attempt to (saga_id, step, direction, attempt)."""

from __future__ import annotations

import hashlib
import hmac

from .keys import PURPOSE_ATTEMPT_TOKEN, subkey


def attempt_token(key: str, saga_id: str, step_index: int, direction: str, attempt: int) -> str:
    """The token a step carries and must hand back with its result, signed with the
    attempt-token subkey of the signing key `key` (keys.py)."""
    message = f"{saga_id}\x1f{step_index}\x1f{direction}\x1f{attempt}".encode()
    return hmac.new(subkey(key, PURPOSE_ATTEMPT_TOKEN), message, hashlib.sha256).hexdigest()


def token_valid(
    key: str, token: object, saga_id: str, step_index: int, direction: str, attempt: int
) -> bool:
    """Whether `token` (from a message: any value) is this attempt's; never raises."""
    # compare_digest raises TypeError on a str with non-ASCII characters; a token is hex.
    if not isinstance(token, str) or not token.isascii():
        return False
    expected = attempt_token(key, saga_id, step_index, direction, attempt)
    return hmac.compare_digest(expected, token)
