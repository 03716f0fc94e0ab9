"""Retry policy values and the pure backoff function."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .model import MAX_ATTEMPT


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently an action or compensation is retried.

    The delay before retry n (1-based) is
    ``min(max_delay_seconds, initial_delay_seconds * backoff_factor ** (n - 1))``,
    spread by +/- ``jitter`` (a fraction) so that retries of many sagas do not align.
    """

    max_attempts: int = 3
    initial_delay_seconds: float = 1.0
    backoff_factor: float = 2.0
    max_delay_seconds: float = 60.0
    jitter: float = 0.1

    def problems(self) -> list[str]:
        """Every rule this policy breaks, as sentences; empty when valid."""
        found: list[str] = []
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            found.append(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        elif self.max_attempts > MAX_ATTEMPT:
            found.append(
                f"max_attempts must be at most {MAX_ATTEMPT} (the highest attempt number a "
                f"step message carries), got {self.max_attempts}"
            )
        numbers = {
            "initial_delay_seconds": self.initial_delay_seconds,
            "backoff_factor": self.backoff_factor,
            "max_delay_seconds": self.max_delay_seconds,
            "jitter": self.jitter,
        }
        finite = True
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                found.append(f"{name} must be a number, got {value!r}")
                finite = False
            elif not math.isfinite(value):
                found.append(f"{name} must be finite, got {value!r}")
                finite = False
        if not finite:
            return found
        if self.initial_delay_seconds < 0:
            found.append(f"initial_delay_seconds must be >= 0, got {self.initial_delay_seconds!r}")
        if self.backoff_factor < 1:
            found.append(f"backoff_factor must be >= 1, got {self.backoff_factor!r}")
        if self.max_delay_seconds < self.initial_delay_seconds:
            found.append(
                "max_delay_seconds must be >= initial_delay_seconds, got "
                f"{self.max_delay_seconds!r} < {self.initial_delay_seconds!r}"
            )
        if not 0 <= self.jitter <= 1:
            found.append(f"jitter must be between 0 and 1, got {self.jitter!r}")
        return found


def backoff_seconds(policy: RetryPolicy, retry_number: int, seed: str) -> float:
    """Delay before retry `retry_number` (1 = first retry); deterministic for a seed."""
    if retry_number < 1:
        raise ValueError(f"retry_number starts at 1, got {retry_number}")
    try:
        growth = policy.backoff_factor ** (retry_number - 1)
    except OverflowError:
        growth = math.inf
    # inf * 0 is nan: a zero initial delay stays zero however large the growth.
    raw = policy.initial_delay_seconds * growth if policy.initial_delay_seconds else 0.0
    base = min(policy.max_delay_seconds, raw)
    if policy.jitter == 0 or base == 0:
        return base
    spread = random.Random(seed).uniform(-policy.jitter, policy.jitter)
    return max(0.0, min(policy.max_delay_seconds, base * (1 + spread)))
