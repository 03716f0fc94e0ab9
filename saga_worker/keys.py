"""Per-purpose keys derived from the signing key (HKDF-SHA256, RFC 5869).

One configured secret signs several kinds of data (attempt tokens, carried checkpoints);
each gets its own key, so that a value signed for one purpose is never valid for another
and a key that leaks from one use says nothing about the others. The fingerprint is derived
the same way: it identifies the key without revealing it.
"""

from __future__ import annotations

import hashlib
import hmac
from functools import lru_cache

_HASH_LEN = 32
#: Salt of every derivation: names the scheme, so that keys derived here differ from any
#: other use of the same secret.
SALT = b"saga_worker signing key v1"

PURPOSE_ATTEMPT_TOKEN = "attempt token"
PURPOSE_STEP_CHECKPOINT = "step checkpoint"
PURPOSE_FINGERPRINT = "fingerprint"


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = _HASH_LEN) -> bytes:
    """RFC 5869 HKDF with SHA-256: extract a pseudorandom key, expand it to `length` bytes."""
    if not 0 < length <= 255 * _HASH_LEN:
        raise ValueError(f"HKDF-SHA256 length must be 1..{255 * _HASH_LEN}, got {length}")
    prk = hmac.new(salt or bytes(_HASH_LEN), ikm, hashlib.sha256).digest()
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


@lru_cache(maxsize=64)
def subkey(key: str, purpose: str) -> bytes:
    """The 32-byte key of one purpose, derived from the configured signing key."""
    return hkdf_sha256(key.encode("utf-8"), SALT, purpose.encode("utf-8"))


def fingerprint(key: str) -> str:
    """What the database keeps to tell whether a process holds the right key: hex of a
    derived value, from which the key cannot be recovered."""
    return subkey(key, PURPOSE_FINGERPRINT).hex()
