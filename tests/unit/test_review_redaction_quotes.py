"""Review of issue 14: an inline secret quoted with an escaped quote inside (JSON text, as an
HTTP API's error body quoted in an exception message) is masked only up to that quote; the
rest of the secret reaches logs and audit rows."""

from __future__ import annotations

import pytest

from saga_worker.audit.redaction import Redactor
from saga_worker.config import DEFAULT_REDACT_KEYS


@pytest.mark.parametrize(
    "text",
    ['{"password": "abc\\"tail-of-secret"}', "{'api_key': 'it\\'s-tail-of-secret'}"],
)
def test_a_quoted_secret_with_an_escaped_quote_is_masked_whole(text: str) -> None:
    masked = Redactor(DEFAULT_REDACT_KEYS).text(text)
    assert masked is not None and "tail-of-secret" not in masked, masked
