"""saga_worker: durable sagas on Celery, checkpointed and audited in PostgreSQL.

Define a saga with `SagaDefinition` and `Step`, `register` it in a module listed in
SAGA_IMPORTS, and start it from any Celery producer with ``send_task("saga.start", ...)``.
"""

from .core.definition import Remote, SagaDefinition, Step, StepInput
from .core.model import Direction, SagaState
from .core.retry import RetryPolicy
from .core.stages import Approval, Parallel, Sleep, WaitFor
from .errors import (
    ConfigurationError,
    InvalidRequest,
    InvalidSagaDefinition,
    NonRetryableStepError,
    SagaError,
    SagaNotFound,
    UnknownSagaType,
)
from .registry import register

__version__ = "0.2.0"

__all__ = [
    "__version__",
    # defining sagas
    "Approval",
    "Parallel",
    "Remote",
    "RetryPolicy",
    "SagaDefinition",
    "Sleep",
    "Step",
    "StepInput",
    "WaitFor",
    "register",
    # states
    "Direction",
    "SagaState",
    # errors
    "ConfigurationError",
    "InvalidRequest",
    "InvalidSagaDefinition",
    "NonRetryableStepError",
    "SagaError",
    "SagaNotFound",
    "UnknownSagaType",
]
