"""Draft-length policies: how many tokens (γ) to draft at each step.

The engine asks a policy for γ before every step and reports back what happened; a fixed γ is the simplest
policy. Adaptive policies live here too so that the engine never needs to know which one it runs.
"""

from __future__ import annotations

from typing import Protocol

from speculor.analysis import optimal_gamma
from speculor.errors import SpeculorError


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


class ConfidenceThreshold:
    """Draft up to `max_gamma` tokens, but end the step early after a token the draft itself was unsure of (its
    probability below `threshold`), as Hugging Face's `assistant_confidence_threshold` does: a token the draft
    doubts is likely to be rejected, and every token after it is then wasted draft work."""

    def __init__(self, max_gamma: int, threshold: float) -> None:
        if max_gamma < 1:
            raise SpeculorError(f"max_gamma must be ≥ 1, got {max_gamma!r}")
        if not 0 <= threshold <= 1:
            raise SpeculorError(f"the confidence threshold must be in [0, 1], got {threshold!r}")
        self.max_gamma = max_gamma
        self.threshold = threshold

    def next_gamma(self) -> int:
        return self.max_gamma

    def observe(self, drafted: int, accepted: int) -> None:
        """The threshold is fixed; the proposer applies it token by token."""

    @property
    def confidence_threshold(self) -> float | None:
        return self.threshold


class LeviathanGamma:
    """Choose γ each step to maximize the predicted speedup E(α, γ) / (γ·c + 1) of Leviathan et al., with α the
    running estimate of per-token acceptance and c the draft/target step cost ratio (measured beforehand, e.g. by
    `speculor bench`).

    α is estimated as accepted / (accepted + rejections) over exponentially decayed counts: each accepted draft is
    a success, each step that ended at a rejected draft one failure. This is the maximum-likelihood estimate when
    tokens are accepted independently with probability α, and unlike TAR it is not biased by γ. The counts start
    from `prior_alpha` worth `prior_weight` trials, so early steps do not swing γ to an extreme.
    """

    def __init__(
        self,
        max_gamma: int,
        cost_ratio: float,
        *,
        decay: float = 0.9,
        prior_alpha: float = 0.6,
        prior_weight: float = 2.0,
    ) -> None:
        if max_gamma < 1:
            raise SpeculorError(f"max_gamma must be ≥ 1, got {max_gamma!r}")
        if cost_ratio < 0:
            raise SpeculorError(f"the cost ratio must be ≥ 0, got {cost_ratio!r}")
        if not 0 < decay <= 1:
            raise SpeculorError(f"decay must be in (0, 1], got {decay!r}")
        if not 0 <= prior_alpha <= 1 or prior_weight <= 0:
            raise SpeculorError("prior_alpha must be in [0, 1] and prior_weight > 0")
        self.max_gamma = max_gamma
        self.cost_ratio = cost_ratio
        self.decay = decay
        self._successes = prior_alpha * prior_weight
        self._trials = prior_weight

    @property
    def alpha(self) -> float:
        """The current estimate of per-token acceptance."""
        return self._successes / self._trials

    def next_gamma(self) -> int:
        return optimal_gamma(self.alpha, self.cost_ratio, range(1, self.max_gamma + 1))

    def observe(self, drafted: int, accepted: int) -> None:
        rejected = 1 if accepted < drafted else 0
        self._successes = self.decay * self._successes + accepted
        self._trials = self.decay * self._trials + accepted + rejected

    @property
    def confidence_threshold(self) -> float | None:
        return None
