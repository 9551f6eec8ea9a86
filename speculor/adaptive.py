"""Draft-length policies: how many tokens (γ) to draft at each step.

The engine asks a policy for γ before every step and reports back what happened; a fixed γ is the simplest
policy. Adaptive policies live here too so that the engine never needs to know which one it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from speculor.analysis import expected_accepted_length, optimal_gamma
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


AUTO_MAX_GAMMA = 6


@dataclass
class StepCosts:
    """Seconds per step measured on this machine at warm-up: `target[(bucket, k)]` for a target step of k tokens on
    `bucket` rows and `draft[bucket]` for a one-token draft step (empty for a draft-free proposer), both back to back
    as the engine queues them; `overhead[bucket]`, the wait for the device that every engine step pays once at its
    host read. Buckets are powers of two; a batch is charged its bucket's cost, the smallest measured bucket that
    holds it."""

    target: dict[tuple[int, int], float]
    draft: dict[int, float] = field(default_factory=dict)
    overhead: dict[int, float] = field(default_factory=dict)

    def bucket(self, batch: int) -> int:
        buckets = sorted({bucket for bucket, _ in self.target})
        return next((bucket for bucket in buckets if bucket >= batch), buckets[-1])

    def step_seconds(self, batch: int, gamma: int) -> float:
        """Predicted seconds of one engine step of `batch` rows drafting γ tokens each: γ draft steps and one
        target step of γ + 1 tokens."""
        bucket = self.bucket(batch)
        widest = max(k for b, k in self.target if b == bucket)
        verify = self.target[(bucket, min(gamma + 1, widest))]
        return gamma * self.draft.get(bucket, 0.0) + verify + self.overhead.get(bucket, 0.0)

    @property
    def widest(self) -> int:
        return max(k for _, k in self.target)


class LoadAwareGamma:
    """One γ per step for a whole batch — 0, no speculation, included — chosen to maximise the expected tokens per
    second: Σ_rows E(α_row, min(γ, cap_row)) / step_seconds(batch, γ), with E Leviathan's expected tokens per target
    forward and α each row's running acceptance estimate.

    Step seconds start from the costs measured at warm-up (`StepCosts`) and are replaced by what the engine's steps
    really take (`observe`: everything the step does, host work and draft catch-up included, which the warm-up's
    bare model steps cannot see) as soon as a (batch bucket, γ) has run. A γ not yet run is predicted from its
    warm-up cost plus the extra the bucket's observed steps took over theirs, fitted linearly in γ. Speculating must
    promise `MARGIN` (5%) more tokens per second than not, so noise in the estimates does not make a batch slower.

    Under a light load a verify of γ + 1 tokens per row costs about what one token costs and speculation wins; as
    the batch grows the verify becomes compute-bound, its cost grows with γ, and the best γ falls to 0. Every choice
    is a step shape captured at warm-up, so switching never leaves the captured graphs. `pair_acceptance` is the
    acceptance over every row so far: a new row's estimate starts from it."""

    OBSERVED_WEIGHT = 0.3
    MARGIN = 1.05

    def __init__(self, costs: StepCosts, max_gamma: int = AUTO_MAX_GAMMA) -> None:
        if max_gamma < 0:
            raise SpeculorError(f"max_gamma must be ≥ 0, got {max_gamma!r}")
        self.costs = costs
        self.max_gamma = min(max_gamma, costs.widest - 1)
        self.pair_acceptance = AcceptanceEstimate(decay=0.98)
        self._observed: dict[tuple[int, int], float] = {}

    def step_seconds(self, batch: int, gamma: int) -> float:
        """What a step of `batch` rows drafting γ is expected to take: observed where it has run, else predicted."""
        return self._observed.get((self.costs.bucket(batch), gamma), self._predicted(batch, gamma))

    def _predicted(self, batch: int, gamma: int) -> float:
        """The warm-up cost plus the host work the warm-up cannot see, fitted from the bucket's observed steps as
        a + b·γ (a step's own work plus each draft pass's); a constant with one γ observed, nothing with none."""
        bucket = self.costs.bucket(batch)
        seen = [
            (seen_gamma, seconds - self.costs.step_seconds(bucket, seen_gamma))
            for (seen_bucket, seen_gamma), seconds in self._observed.items()
            if seen_bucket == bucket
        ]
        extra = 0.0
        if seen:
            mean_gamma = sum(g for g, _ in seen) / len(seen)
            mean_extra = sum(e for _, e in seen) / len(seen)
            spread = sum((g - mean_gamma) ** 2 for g, _ in seen)
            slope = sum((g - mean_gamma) * (e - mean_extra) for g, e in seen) / spread if spread else 0.0
            extra = mean_extra + slope * (gamma - mean_gamma)
        return max(self.costs.step_seconds(batch, gamma) + extra, 1e-9)

    def observe(self, batch: int, gamma: int, seconds: float) -> None:
        """How long an engine step of `batch` rows that drafted γ took."""
        bucket = self.costs.bucket(batch)
        previous = self._observed.get((bucket, gamma))
        self._observed[(bucket, gamma)] = (
            seconds if previous is None else previous + self.OBSERVED_WEIGHT * (seconds - previous)
        )

    def choose(self, alphas: Sequence[float], caps: Sequence[int]) -> int:
        """The best γ for rows with acceptance estimates `alphas` that may draft at most `caps` tokens each."""
        batch = len(alphas)
        best_gamma, best_rate = 0, self.MARGIN * batch / self.step_seconds(batch, 0)
        for gamma in range(1, min(self.max_gamma, max(caps, default=0)) + 1):
            tokens = sum(
                expected_accepted_length(alpha, min(gamma, cap)) for alpha, cap in zip(alphas, caps, strict=True)
            )
            rate = tokens / self.step_seconds(batch, gamma)
            if rate > best_rate:
                best_gamma, best_rate = gamma, rate
        return best_gamma


class AcceptanceEstimate:
    """A running per-token acceptance estimate α from decayed counts, as `LeviathanGamma` keeps it: every accepted
    draft a success, every step that ended at a rejected draft one failure, starting from `prior` worth `weight`
    trials."""

    def __init__(self, prior: float = 0.6, weight: float = 2.0, decay: float = 0.9) -> None:
        self._successes = prior * weight
        self._trials = weight
        self.decay = decay

    @property
    def alpha(self) -> float:
        return min(self._successes / self._trials, 0.999)

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        rejected = 1 if accepted < drafted else 0
        self._successes = self.decay * self._successes + accepted
        self._trials = self.decay * self._trials + accepted + rejected
