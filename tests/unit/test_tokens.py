"""Attempt tokens: a token from a message is compared, never trusted to be ASCII."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from saga_worker.tokens import attempt_token, token_valid

KEY = "k" * 40


def test_a_genuine_token_is_valid_and_another_attempts_is_not() -> None:
    token = attempt_token(KEY, "s1", 1, "forward", 1)
    assert token_valid(KEY, token, "s1", 1, "forward", 1)
    assert not token_valid(KEY, token, "s1", 1, "forward", 2)


@given(st.text(max_size=80))
def test_any_text_is_refused_without_raising(token: str) -> None:
    # hmac.compare_digest raises TypeError for a str holding non-ASCII characters: a
    # message's token ("é" * 64, a lone surrogate) must be refused, not crash the task.
    assert not token_valid(KEY, token, "s1", 1, "forward", 1)


def test_non_ascii_and_surrogate_tokens_are_refused() -> None:
    for token in ("é" * 64, "\ud800" * 64, "\x00" * 64, "f" * 63 + "é"):
        assert not token_valid(KEY, token, "s1", 1, "forward", 1)
