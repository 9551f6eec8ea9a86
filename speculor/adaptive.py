"""Draft-length policies: how many tokens (γ) to draft at each step.

The engine asks a policy for γ before every step and reports back what happened; a fixed γ is the simplest
policy. Adaptive policies live here too so that the engine never needs to know which one it runs.
"""

from __future__ import annotations

from typing import Protocol


class GammaPolicy(Protocol):
    def next_gamma(self) -> int:
        """How many tokens to draft in the coming step (≥ 1)."""
        ...

    def observe(self, drafted: int, accepted: int) -> None:
        """What the last step drafted and how many of those the target accepted."""
        ...

    @property
    def confidence_threshold(self) -> float | None:
        """Stop drafting within a step once the draft's probability of its token falls below this (None: never)."""
        ...


class FixedGamma:
    """Always draft the same number of tokens."""

    def __init__(self, gamma: int) -> None:
        self.gamma = gamma

    def next_gamma(self) -> int:
        return self.gamma

    def observe(self, drafted: int, accepted: int) -> None:
        """A fixed γ learns nothing."""

    @property
    def confidence_threshold(self) -> float | None:
        return None
