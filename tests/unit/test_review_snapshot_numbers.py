"""Review of issue 14: the carried checkpoint's MAC must cover the context exactly.

The MAC is taken over RFC 8785 (JCS) text, which reads every number as a double: integers
beyond 2**53 that differ, and 1 vs 1.0, serialize alike. A trusted carried checkpoint runs
the step's action on the message's context, so an edited context must not verify.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from saga_worker.worker import snapshot
from tests.unit.test_snapshot import KEY, NOW, checkpoint, decode, wire


@pytest.mark.parametrize(
    "signed, edited",
    [
        (2**53 + 1, 2**53),  # an account number or amount beyond 2**53
        (12345678901234567891, 12345678901234567000),
        (1, 1.0),
    ],
)
def test_an_edited_number_in_the_message_context_is_not_trusted(signed: Any, edited: Any) -> None:
    genuine = checkpoint()
    saga = replace(genuine.saga, context={**genuine.saga.context, "account": signed})
    carried = wire(snapshot.encode(KEY, replace(genuine, saga=saga), NOW - 1))
    forged_context = wire({**genuine.saga.context, "account": edited})
    assert forged_context["account"] != signed or type(forged_context["account"]) is not type(
        signed
    )
    loaded = decode(carried, context=forged_context)
    # The step would run its action on this context: the MAC must not hold for it.
    assert loaded is None, f"context {forged_context['account']!r} verified as {signed!r}"
