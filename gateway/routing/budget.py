"""A retry budget: retries may add at most `ratio` extra load, so a sick fleet is not hammered.

A token bucket: every request deposits `ratio` tokens, every retry spends one. A small floor lets a
quiet gateway still retry the odd failure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RetryBudget:
    ratio: float = 0.2
    floor: float = 3.0
    cap: float = 100.0
    tokens: float = 3.0

    def deposit(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def __post_init__(self) -> None:
        self.tokens = max(self.tokens, self.floor)
