"""The waiting benchmark saga of `bash bench/run.sh scale` (bench/load.py): a step, a wait
for the `release` signal, a step.

Its own module, imported through SAGA_IMPORTS by the scale mode only: the main benchmark's
worker keeps exactly its one saga type (each type adds a version queue the worker polls),
and `bench.sagas` still loads on checkouts from before waits existed (bench/ab.py).
The completion hook of `bench.sagas` pushes any saga that reaches COMPLETED, this one too.
"""

from __future__ import annotations

from typing import Any

from saga_worker import SagaDefinition, Step, StepInput, WaitFor, register

SAGA_TYPE = "bench_wait_saga"
SIGNAL = "release"
#: Far beyond any run: no wait may time out (no beat runs, so none would fire anyway).
TIMEOUT_SECONDS = 86_400


def prepare(call: StepInput) -> dict[str, Any]:
    return {"a": int(call.context["n"]) + 1}


def finish(call: StepInput) -> dict[str, Any]:
    return {"c": int(call.context["a"]) + int(bool(call.context.get("released")))}


DEFINITION = register(
    SagaDefinition(
        SAGA_TYPE,
        [
            Step("prepare", prepare),
            WaitFor("await_release", signal=SIGNAL, timeout_seconds=TIMEOUT_SECONDS),
            Step("finish", finish),
        ],
    )
)
