"""Speculative sampling is lossless: the engine's output distribution equals the target's, enumerated exactly.

The models are table-lookup runners over a 4-token vocabulary (see fakes.py), so three generated tokens have 64
possible outcomes whose exact probabilities under the target alone can be enumerated. A deliberately wrong
acceptance rule must fail the same test, which shows the test has the power to catch one.
"""

from __future__ import annotations

import itertools

import pytest
from fakes import TableRunner

from speculor import engine
from speculor.adaptive import FixedGamma
from speculor.engine import DecodeRequest, Decoding
from speculor.proposers import DraftModelProposer
from speculor.sampling import SamplingParams, probabilities, sample
from speculor.text import TextTracker
from speculor.verify import stochastic_accept

VOCAB = 4
PROMPT = [1, 2]
NEW_TOKENS = 3
SAMPLES = 1500


def exact_distribution(params: SamplingParams) -> dict[tuple[int, ...], float]:
    target = TableRunner(VOCAB, seed=0)
    result = {}
    for outcome in itertools.product(range(VOCAB), repeat=NEW_TOKENS):
        probability, context = 1.0, list(PROMPT)
        for token in outcome:
            probability *= float(probabilities(target.logits_after(context), params)[token])
            context.append(token)
        result[outcome] = probability
    return result


def empirical_distribution(params: SamplingParams, gamma: int) -> dict[tuple[int, ...], float]:
    target, draft = TableRunner(VOCAB, seed=0), TableRunner(VOCAB, seed=1, sharpness=2.5)
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(SAMPLES):
        request = DecodeRequest(
            prompt_ids=PROMPT,
            max_new_tokens=NEW_TOKENS,
            params=params,
            gamma=FixedGamma(gamma),
            eos_ids=frozenset(),
            seed=seed,
        )
        decoding = Decoding(target, DraftModelProposer(draft, VOCAB), VOCAB, TextTracker(None, []), request)
        for _ in decoding:
            pass
        outcome = tuple(decoding.result.token_ids)
        counts[outcome] = counts.get(outcome, 0) + 1
    return {outcome: count / SAMPLES for outcome, count in counts.items()}


def chi_square_excess(exact: dict, empirical: dict) -> float:
    """Pearson's statistic over outcomes with enough expected mass (cells with expected count < 5 are pooled), minus
    a critical value of df + 5·sqrt(2·df) — far in the tail (beyond the 99.99th percentile for these df). Positive
    means the empirical distribution is not the exact one. Seeds are fixed, so the outcome is deterministic."""
    statistic, pooled_expected, pooled_observed, cells = 0.0, 0.0, 0.0, 0
    for outcome, probability in exact.items():
        expected, observed = probability * SAMPLES, empirical.get(outcome, 0.0) * SAMPLES
        if expected < 5:
            pooled_expected += expected
            pooled_observed += observed
        else:
            statistic += (observed - expected) ** 2 / expected
            cells += 1
    if pooled_expected > 0:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        cells += 1
    degrees_of_freedom = cells - 1
    return statistic - (degrees_of_freedom + 5 * (2 * degrees_of_freedom) ** 0.5)


SETTINGS = [
    (SamplingParams(temperature=1.0), 3),
    (SamplingParams(temperature=0.7, top_k=3, top_p=0.9), 2),
]


@pytest.mark.parametrize(("params", "gamma"), SETTINGS)
def test_speculative_sampling_matches_target_distribution(params, gamma):
    assert chi_square_excess(exact_distribution(params), empirical_distribution(params, gamma)) < 0


def residual_ignoring_accept(draft_tokens, draft_probs, target_probs, generator):
    """Wrong on purpose: after a rejection it samples from p, not from normalize(max(0, p − q))."""
    accepted, _ = stochastic_accept(draft_tokens, draft_probs, target_probs, generator)
    return accepted, sample(target_probs[accepted], generator)


@pytest.mark.parametrize(("params", "gamma"), SETTINGS)
def test_broken_acceptance_rule_is_caught(monkeypatch, params, gamma):
    monkeypatch.setattr(engine, "stochastic_accept", residual_ignoring_accept)
    assert chi_square_excess(exact_distribution(params), empirical_distribution(params, gamma)) > 0


def test_same_seed_same_output():
    params = SamplingParams(temperature=1.0)
    runs = []
    for _ in range(2):
        target, draft = TableRunner(VOCAB, seed=0), TableRunner(VOCAB, seed=1)
        request = DecodeRequest(PROMPT, 12, params, FixedGamma(3), frozenset(), seed=42)
        decoding = Decoding(target, DraftModelProposer(draft, VOCAB), VOCAB, TextTracker(None, []), request)
        runs.append([delta.token_ids for delta in decoding])
    assert runs[0] == runs[1]
