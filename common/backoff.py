"""Retry pacing shared by everything that reconnects (coordinator to workers, workers dialling out)."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, base * 2**attempt))``."""

    def __init__(self, *, base: float = 0.25, cap: float = 10.0) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0
        self._rng = random.Random()

    def next_delay(self) -> float:
        delay = self._rng.uniform(self.base / 2, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
