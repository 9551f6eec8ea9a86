"""The speedup model of Leviathan et al. (2211.17192, §3), as pure functions of numbers.

α is the probability that the target accepts one drafted token (assumed the same at every position), γ the number
of drafted tokens per step and c the cost of one draft step relative to one target step. Then a step emits
E(α, γ) = (1 − α^(γ+1)) / (1 − α) tokens on average (accepted drafts plus the one token the target always adds)
and costs γ·c + 1 target-step times, so the expected wall-clock speedup over the target alone is E / (γ·c + 1).

The measured token acceptance rate (TAR = accepted / drafted) is not α: drafting stops counting at the first
rejection, so later positions are drafted but rarely accepted. `alpha_from_tar` undoes that.
"""

from __future__ import annotations

from collections.abc import Iterable

from speculor.errors import SpeculorError


def _check(alpha: float, gamma: float) -> None:
    if not 0 <= alpha <= 1:
        raise SpeculorError(f"alpha must be in [0, 1], got {alpha!r}")
    if gamma < 0:
        raise SpeculorError(f"gamma must be ≥ 0, got {gamma!r}")


def expected_accepted_length(alpha: float, gamma: float) -> float:
    """E(α, γ): expected tokens emitted per target forward, the bonus/correction token included (1 ≤ E ≤ γ + 1).
    γ may be a mean over steps (not an integer) when the draft length varies."""
    _check(alpha, gamma)
    if alpha == 1:
        return float(gamma + 1)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_tar(alpha: float, gamma: float) -> float:
    """The acceptance rate TAR that per-token acceptance α produces at γ: (E(α, γ) − 1) / γ."""
    _check(alpha, gamma)
    if gamma == 0:
        return 0.0
    return (expected_accepted_length(alpha, gamma) - 1) / gamma


def predicted_speedup(alpha: float, gamma: float, cost_ratio: float) -> float:
    """Expected wall-clock speedup over the target alone: E(α, γ) / (γ·c + 1)."""
    if cost_ratio < 0:
        raise SpeculorError(f"the cost ratio c must be ≥ 0, got {cost_ratio!r}")
    return expected_accepted_length(alpha, gamma) / (gamma * cost_ratio + 1)


def optimal_gamma(alpha: float, cost_ratio: float, gammas: Iterable[int] = range(1, 17)) -> int:
    """The γ among `gammas` with the highest predicted speedup (the smallest one on a tie)."""
    candidates = sorted(set(gammas))
    if not candidates:
        raise SpeculorError("optimal_gamma needs at least one candidate gamma")
    return max(candidates, key=lambda gamma: (predicted_speedup(alpha, gamma, cost_ratio), -gamma))


def alpha_from_tar(tar: float, gamma: int, *, tolerance: float = 1e-12) -> float:
    """The per-token acceptance α whose expected TAR at a fixed γ equals `tar`, found by bisection (TAR grows
    monotonically with α from 0 to 1). At γ = 1 the two are the same."""
    if gamma < 1:
        raise SpeculorError(f"gamma must be ≥ 1 to estimate alpha from TAR, got {gamma!r}")
    if not 0 <= tar <= 1:
        raise SpeculorError(f"TAR must be in [0, 1], got {tar!r}")
    low, high = 0.0, 1.0
    while high - low > tolerance:
        middle = (low + high) / 2
        if expected_tar(middle, gamma) < tar:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def alpha_from_counts(accepted: int, rejections: int) -> float:
    """Maximum-likelihood α from what the steps did: each accepted draft is a success and each step that stopped at
    a rejected draft one failure (a step whose drafts were all accepted ends without a failure). Unlike
    `alpha_from_tar` it needs no fixed γ, so it also holds for adaptive policies."""
    if accepted < 0 or rejections < 0:
        raise SpeculorError(f"counts must be ≥ 0, got accepted={accepted!r}, rejections={rejections!r}")
    trials = accepted + rejections
    return accepted / trials if trials else 0.0


def cost_ratio(draft_seconds: float, draft_steps: int, target_seconds: float, target_steps: int) -> float:
    """c: the time of one draft step over the time of one target step (each a total divided by its count)."""
    if draft_steps <= 0 or target_steps <= 0 or target_seconds <= 0:
        raise SpeculorError("the cost ratio needs at least one timed draft step and one timed target step")
    return (draft_seconds / draft_steps) / (target_seconds / target_steps)
