"""Exponential backoff with full jitter: the one every retry loop uses (connections, Kafka, the registry, tasks)."""

from __future__ import annotations

import random


class Backoff:
    """A uniform delay in [0, min(cap, base * 2**n)] after the n-th failure in a row."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure. Never overflows: the exponent
        stops growing long after the cap is reached (a weekend of failures is as good as a few)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures, 64))
        self.failures += 1
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        """Forget past failures, after an attempt proved healthy."""
        self.failures = 0
