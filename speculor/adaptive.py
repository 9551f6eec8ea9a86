"""Draft-length policies: how many tokens (γ) to draft at each step.

The engine asks a policy for γ before every step and reports back what happened; a fixed γ is the simplest
policy. Adaptive policies live here too so that the engine never needs to know which one it runs.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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


AUTO_MAX_GAMMA = 6


class _Curve:
    """Seconds as a function of a small integer (a step's width, a number of draft passes), learned from
    observations: per value, the median of its last `WINDOW` observations (a one-off stall — a kernel compiled on
    first use, a page fault — cannot drag it for long); between observed values a straight line through the two
    nearest, beyond them the least-squares line through all of them; nothing with none. With one point the curve is
    flat: optimistic for a longer draft or a wider verify, so the policy tries one and learns its real cost."""

    WINDOW = 9

    def __init__(self) -> None:
        self.points: dict[int, float] = {}
        self._recent: dict[int, deque[float]] = {}
        self._predicted: dict[int, float | None] = {}

    def observe(self, x: int, seconds: float) -> None:
        recent = self._recent.setdefault(x, deque(maxlen=self.WINDOW))
        recent.append(seconds)
        self.points[x] = statistics.median(recent)
        self._predicted.clear()

    def __call__(self, x: int) -> float | None:
        if x not in self._predicted:
            self._predicted[x] = self._predict(x)
        return self._predicted[x]

    def _predict(self, x: int) -> float | None:
        if x in self.points:
            return self.points[x]
        if not self.points:
            return None
        xs = sorted(self.points)
        if len(xs) == 1:
            return self.points[xs[0]]
        below = [v for v in xs if v < x]
        above = [v for v in xs if v > x]
        if below and above:
            left, right = below[-1], above[0]
            slope = (self.points[right] - self.points[left]) / (right - left)
            return self.points[left] + slope * (x - left)
        mean_x = sum(xs) / len(xs)
        mean_y = sum(self.points.values()) / len(xs)
        slope = sum((v - mean_x) * (self.points[v] - mean_y) for v in xs) / sum((v - mean_x) ** 2 for v in xs)
        return max(0.0, mean_y + slope * (x - mean_x))


@dataclass
class _BucketCosts:
    """What steps of one batch bucket cost, learned from the engine's own steps: the target's verify by width, the
    draft's phase by number of draft passes, and the host work around them (everything else the step took)."""

    verify: _Curve = field(default_factory=_Curve)
    draft: _Curve = field(default_factory=_Curve)
    host: _Curve = field(default_factory=_Curve)
    pipelined: _Curve = field(default_factory=_Curve)
    catch_up: float = 0.0
    choices: int = 0
    # Decisions until speculation is retried while not speculating; the gap doubles after each retry that did not
    # win, so a draft that never pays costs ever less to keep checking.
    retry_gap: int = 0
    until_retry: int = 0

    def __post_init__(self) -> None:
        self.retry_gap = self.until_retry = LoadAwareGamma.RETRY_SPECULATION_EVERY


class PositionAcceptance:
    """How often a drafted token is accepted at each draft position, given that every earlier one was: decayed
    counts per position, each shrunk towards the position before it (the first towards `prior`). Expected tokens per
    step follow without assuming one α for every position, which misjudges long drafts: later positions are often
    accepted more or less often than the first."""

    PRIOR_WEIGHT = 2.0
    STEP_DECAY = 0.97

    def __init__(self, prior: float = 0.6, decay: float = 0.995, positions: int = 16) -> None:
        self.prior = prior
        self.decay = decay
        self.reached = [0.0] * positions
        self.accepted = [0.0] * positions

    def observe_rows(self, steps: Sequence[tuple[int, int]]) -> None:
        """Several rows' steps at once, (drafted, accepted) each; the counts decay once for all of them."""
        steps = [(drafted, accepted) for drafted, accepted in steps if drafted]
        if not steps:
            return
        # Forget per row, but never faster than `STEP_DECAY` per step: a batch of 64 rows is one moment's sample.
        factor = max(self.decay ** len(steps), self.STEP_DECAY)
        self.reached = [count * factor for count in self.reached]
        self.accepted = [count * factor for count in self.accepted]
        for drafted, accepted in steps:
            for position in range(min(accepted + 1, drafted, len(self.reached))):
                self.reached[position] += 1
                if position < accepted:
                    self.accepted[position] += 1

    def rates(self, gamma: int) -> list[float]:
        """The conditional acceptance of positions 1..γ."""
        rates, previous = [], self.prior
        for position in range(min(gamma, len(self.reached))):
            previous = (self.accepted[position] + self.PRIOR_WEIGHT * previous) / (
                self.reached[position] + self.PRIOR_WEIGHT
            )
            rates.append(min(previous, 0.999))
        return rates + [rates[-1] if rates else self.prior] * (gamma - len(rates))

    def expected_tokens(self, gamma: int) -> float:
        """Tokens one step emits on average when drafting γ: 1 + Σ_j Π_{i≤j} a_i."""
        return self.expected_tokens_upto(gamma)[gamma]

    def expected_tokens_upto(self, gamma: int) -> list[float]:
        """`expected_tokens` for every γ from 0 to `gamma`, in one pass."""
        totals, survive = [1.0], 1.0
        for rate in self.rates(gamma):
            survive *= rate
            totals.append(totals[-1] + survive)
        return totals


class LoadAwareGamma:
    """One γ per step for a whole batch — 0, no speculation, included — chosen to maximise the tokens per second the
    step is expected to deliver: Σ_rows E_row(min(γ, cap_row)) / seconds(batch, γ).

    Both sides are learned online from the engine's own steps, so nothing is measured before the first token:
    - E from acceptance by draft position (`PositionAcceptance`), kept per kind of row (greedy, sampled, coupled
      seeded rows), since temperature and verification rule change acceptance a lot;
    - seconds(batch, γ) = host work + the draft phase for `draft_passes(γ)` passes + a verify of γ + 1 tokens, each
      learned per batch bucket (powers of two) from the phase times every step reports; a width or pass count not yet
      run is predicted along a line through those that have (flat with one), and an empty bucket borrows the nearest
      one's costs. So one step at γ = 0 and one at some γ > 0 predict every γ, and a prediction that was too hopeful
      is corrected by the very step that ran it.
    Exploration: every `EXPLORE_EVERY`-th decision in a bucket tries the best γ's neighbour for one step when it is
    predicted within `EXPLORE_WITHIN` of the best, and while not speculating, every `RETRY_SPECULATION_EVERY`-th
    decision retries the most promising γ when within `RETRY_SPECULATION_WITHIN`, so a wrong early estimate cannot
    stick; a γ never run is tried once (its cost is unknown, so it looks free). Speculating must
    promise `MARGIN` more tokens per second than not, so noise cannot make a batch slower than the target alone. It
    adapts within a few steps: each cost is the median of its last nine observations (one-off stalls do not stick),
    and acceptance forgets with a half-life of ~140 row-steps (at least ~23 steps). The decoder keeps one policy for
    all its engines, so what it learned carries over."""

    MARGIN = 1.02
    EXPLORE_EVERY = 4
    EXPLORE_WITHIN = 0.9
    RETRY_SPECULATION_EVERY = 8
    RETRY_SPECULATION_WITHIN = 0.75
    MAX_RETRY_GAP = 256
    DECIDE_EVERY = 8
    CATCH_UP_WEIGHT = 0.05

    def __init__(self, max_gamma: int = AUTO_MAX_GAMMA, draft_passes: Callable[[int], int] | None = None) -> None:
        if max_gamma < 0:
            raise SpeculorError(f"max_gamma must be ≥ 0, got {max_gamma!r}")
        self.max_gamma = max_gamma
        self.draft_passes = draft_passes or (lambda gamma: gamma)
        self.acceptance: dict[str, PositionAcceptance] = {}
        self._buckets: dict[int, _BucketCosts] = {}
        self._nearest: dict[int, list[_BucketCosts]] = {}
        self._decision: tuple[tuple, int, int] | None = None

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, batch - 1).bit_length()

    def _costs(self, bucket: int) -> list[_BucketCosts]:
        """The bucket's own costs first, then the other buckets nearest to it, to borrow what it has not seen
        (remembered until a new bucket appears: this runs many times per step)."""
        near = self._nearest.get(bucket)
        if near is None:
            order = sorted(self._buckets, key=lambda other: (abs(other.bit_length() - bucket.bit_length()), other))
            near = self._nearest[bucket] = [self._buckets[b] for b in order]
        return near

    def step_seconds(self, batch: int, gamma: int) -> float | None:
        """What a step of `batch` rows drafting γ is expected to take (None while nothing is known): as measured
        when such steps ran queued behind the one before (nothing of the host's work shows then), else the sum
        of its parts."""
        bucket = self.bucket(batch)
        if self._buckets:
            pipelined = next(
                (c.pipelined.points[gamma] for c in self._costs(bucket) if gamma in c.pipelined.points), None
            )
            if pipelined is not None:
                return pipelined
        passes = self.draft_passes(gamma) if gamma else 0
        parts = []
        for curve, x in (("host", 0), ("verify", gamma + 1), ("draft", passes)):
            if curve == "draft" and gamma == 0:
                continue
            value = next((getattr(c, curve)(x) for c in self._costs(bucket) if getattr(c, curve)(x) is not None), None)
            if value is None:
                return None
            parts.append(value)
        if gamma:
            parts.append(self._costs(bucket)[0].catch_up)
        return sum(parts)

    def observe(
        self,
        batch: int,
        gamma: int,
        passes: int,
        draft_seconds: float,
        verify_seconds: float,
        seconds: float,
        caught_up: bool = False,
    ) -> None:
        """An engine step of `batch` rows drafted γ in `passes` draft passes: its draft phase, its verify phase and
        all of it took these seconds. `caught_up` says the draft phase also fed a draft cache what it had missed (a
        joining row's prompt, or the tokens of steps without drafting): that part is kept apart, as the catch-up
        that steps drafting γ > 0 pay on average — real in a server where rows keep joining, and the price of
        switching speculation back on."""
        costs = self._bucket_costs(batch)
        costs.verify.observe(gamma + 1, verify_seconds)
        drafting = draft_seconds
        if gamma:
            if caught_up:
                known = costs.draft(passes)
                drafting = min(draft_seconds, known) if known is not None else draft_seconds
            else:
                costs.draft.observe(passes, draft_seconds)
            costs.catch_up += self.CATCH_UP_WEIGHT * (draft_seconds - drafting - costs.catch_up)
        costs.host.observe(0, max(0.0, seconds - verify_seconds - draft_seconds))

    def observe_pipelined(self, batch: int, gamma: int, seconds: float) -> None:
        """A step drafting γ (0: none) that was queued on the device during the previous step (the engine's
        look-ahead): the host's work hid behind the device's, so it took only this long — what the choice costs
        while the policy keeps making it."""
        self._bucket_costs(batch).pipelined.observe(gamma, seconds)

    def _bucket_costs(self, batch: int) -> _BucketCosts:
        bucket = self.bucket(batch)
        if bucket not in self._buckets:
            self._buckets[bucket] = _BucketCosts()
            self._nearest.clear()
        return self._buckets[bucket]

    def observe_acceptance(self, kind: str, steps: Sequence[tuple[int, int]]) -> None:
        """What rows of one kind drafted and had accepted in a step, (drafted, accepted) per row."""
        self.acceptance.setdefault(kind, PositionAcceptance()).observe_rows(steps)

    def choose(self, kinds: Sequence[str], caps: Sequence[int]) -> int:
        """The best γ for rows of these kinds that may draft at most `caps` tokens each. A decision stands for
        `DECIDE_EVERY` steps of the same batch (the same bucket, kinds and largest cap): costs and acceptance move
        slowly, and on a small model a decision's Python costs as much as a step."""
        batch = len(kinds)
        top = min(self.max_gamma, max(caps, default=0))
        if top == 0:
            return 0
        key = (self.bucket(batch), top, frozenset(kinds))
        if self._decision is not None and self._decision[0] == key and self._decision[2] > 0:
            self._decision = (key, self._decision[1], self._decision[2] - 1)
            return self._decision[1]
        gamma, settled = self._decide(batch, kinds, caps, top)
        # An exploring choice runs one step; a settled one stands.
        self._decision = (key, gamma, self.DECIDE_EVERY - 1 if settled else 0)
        return gamma

    def _decide(self, batch: int, kinds: Sequence[str], caps: Sequence[int], top: int) -> tuple[int, bool]:
        """(γ, whether it is the best prediction rather than an exploration)."""
        base = self.step_seconds(batch, 0)
        groups: dict[tuple[str, int], int] = {}
        for kind, cap in zip(kinds, caps, strict=True):
            groups[(kind, min(cap, top))] = groups.get((kind, min(cap, top)), 0) + 1
        expected = {
            kind: self.acceptance.setdefault(kind, PositionAcceptance()).expected_tokens_upto(top)
            for kind in {kind for kind, _ in groups}
        }
        rates = {0: batch / base / self.MARGIN if base else 0.0}
        for gamma in range(1, top + 1):
            seconds = self.step_seconds(batch, gamma)
            tokens = sum(count * expected[kind][min(gamma, cap)] for (kind, cap), count in groups.items())
            # Never run: optimistic, so it gets tried (and measured) once.
            rates[gamma] = tokens / seconds if seconds else float("inf")
        best = max(rates, key=rates.__getitem__)
        costs = self._bucket_costs(batch)
        costs.choices += 1
        if best:
            costs.retry_gap = costs.until_retry = self.RETRY_SPECULATION_EVERY
        else:
            # Not speculating teaches nothing new about speculating: now and then retry the most promising γ, ever
            # more rarely while the retries keep losing (each costs a draft catch-up as well as its step).
            costs.until_retry -= 1
            if costs.until_retry <= 0:
                costs.retry_gap = min(2 * costs.retry_gap, self.MAX_RETRY_GAP)
                costs.until_retry = costs.retry_gap
                hopeful = max((g for g in rates if g), key=rates.__getitem__)
                if rates[hopeful] >= self.RETRY_SPECULATION_WITHIN * rates[0]:
                    return hopeful, False
        if costs.choices % self.EXPLORE_EVERY == 0:
            close = self.EXPLORE_WITHIN * rates[best]
            neighbours = [g for g in (best + 1, best - 1) if g in rates and rates[g] >= close]
            if neighbours:
                return neighbours[(costs.choices // self.EXPLORE_EVERY) % len(neighbours)], False
        return best, rates[best] != float("inf")

    def snapshot(self) -> dict:
        """What the policy has learned, for reports: per batch bucket the host, verify-by-width and draft-by-passes
        seconds, and per kind of row the acceptance of each draft position."""
        return {
            "buckets": {
                bucket: {
                    "host": costs.host.points.get(0),
                    "verify_by_width": dict(sorted(costs.verify.points.items())),
                    "draft_by_passes": dict(sorted(costs.draft.points.items())),
                    "catch_up": costs.catch_up,
                    "pipelined_by_gamma": dict(sorted(costs.pipelined.points.items())),
                }
                for bucket, costs in sorted(self._buckets.items())
            },
            "acceptance_by_position": {kind: acc.rates(self.max_gamma) for kind, acc in self.acceptance.items()},
        }
