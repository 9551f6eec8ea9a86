"""Speculative sampling is lossless: the engine's output distribution equals the target's, enumerated exactly.

The models are table-lookup runners over a 4-token vocabulary (see fakes.py), so three generated tokens have 64
possible outcomes whose exact probabilities under the target alone can be enumerated; the filtering behind them
comes from transformers' own warpers (tests/exact_reference.py), not from speculor's `probabilities`, so the
reference is independent of the engine. The requests run as batches of eight rows, each with its own seed, so the
rule is checked per row of a batch, end to end through the engine.

1,500 samples only catch gross errors (a rule resampling from p instead of the residual fails here); small ones,
such as the residual taken at the wrong draft position or a 10% over-acceptance, are caught exactly, without
sampling, by tests/test_acceptance_reference.py, and tests/test_mutations.py proves it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from exact_reference import warped_probabilities
from fakes import TableRunner

from speculor import engine
from speculor.adaptive import FixedGamma
from speculor.api import run_batch
from speculor.engine import BatchEngine, DecodeRequest
from speculor.proposers import DraftModelProposer
from speculor.sampling import SamplingParams
from speculor.verify import stochastic_accept

VOCAB = 4
PROMPT = [1, 2]
NEW_TOKENS = 3
SAMPLES = 1500
BATCH = 8


def exact_distribution(params: SamplingParams) -> dict[tuple[int, ...], float]:
    target = TableRunner(VOCAB, seed=0)
    result = {}
    for outcome in itertools.product(range(VOCAB), repeat=NEW_TOKENS):
        probability, context = 1.0, list(PROMPT)
        for token in outcome:
            probability *= float(warped_probabilities(target.logits_after(context), params)[token])
            context.append(token)
        result[outcome] = probability
    return result


def sampling_engine() -> BatchEngine:
    target = TableRunner(VOCAB, seed=0, slots=BATCH)
    draft = TableRunner(VOCAB, seed=1, sharpness=2.5, slots=BATCH)
    return BatchEngine(target, DraftModelProposer(draft, VOCAB), VOCAB, None)


def empirical_distribution(params: SamplingParams, gamma: int) -> dict[tuple[int, ...], float]:
    requests = [
        DecodeRequest(PROMPT, NEW_TOKENS, params, FixedGamma(gamma), frozenset(), seed=seed) for seed in range(SAMPLES)
    ]
    counts: dict[tuple[int, ...], int] = {}
    for result in run_batch(sampling_engine(), requests):
        outcome = tuple(result.token_ids)
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


def residual_ignoring_accept(draft_tokens, counts, draft_probs, target_probs, uniforms):
    """Wrong on purpose: after a rejection it samples from p, not from normalize(max(0, p − q))."""
    accepted, _ = stochastic_accept(draft_tokens, counts, draft_probs, target_probs, uniforms)
    return accepted, target_probs[torch.arange(len(accepted)), accepted]


@pytest.mark.parametrize(("params", "gamma"), SETTINGS)
def test_broken_acceptance_rule_is_caught(monkeypatch, params, gamma):
    monkeypatch.setattr(engine, "stochastic_accept", residual_ignoring_accept)
    assert chi_square_excess(exact_distribution(params), empirical_distribution(params, gamma)) > 0


def test_same_seed_same_output_alone_and_in_any_batch():
    """A seeded request draws the same numbers whatever shares its batch or whichever slot it gets."""

    def request(seed: int, temperature: float = 1.0) -> DecodeRequest:
        sampling = SamplingParams(temperature=temperature, top_k=3) if temperature else SamplingParams()
        return DecodeRequest(PROMPT, 12, sampling, FixedGamma(3), frozenset(), seed=seed)

    alone = run_batch(sampling_engine(), [request(42)])
    crowd = [request(seed, temperature) for seed, temperature in zip(range(5), (0.0, 0.5, 1.3, 0.0, 0.9), strict=True)]
    mixed = run_batch(sampling_engine(), [*crowd[:3], request(42), *crowd[3:]])
    assert mixed[3].token_ids == alone[0].token_ids
    assert len(set(map(tuple, (r.token_ids for r in mixed)))) > 3
