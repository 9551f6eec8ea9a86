"""The acceptance rule and the filtering against independent exact references (tests/exact_reference.py), with
exact probabilities instead of samples, so that small errors cannot hide in sampling noise.

`stochastic_accept` turns uniforms into decisions; integrating over them gives its exact law. Along a draft, the
decision at position j depends only on u_j, and is "accept" on an interval of u_j starting at 0, whose length is
found by bisection (the earlier positions forced to accept with u = 0). Multiplying those acceptance probabilities
along every draft sequence, weighted by q, and the distribution the rule returns at each stopping point gives the
rule's law of the emitted tokens, which must equal the enumerated reference to rounding. The criterion functions
look the engine's functions up through their modules, so tests/test_mutations.py can swap known-wrong rules in and
show that each is rejected.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from exact_reference import Conditional, law_gap, speculative_step_law, target_law_of_prefixes, warped_probabilities

from speculor import sampling, verify
from speculor.sampling import RowSampling, SamplingParams, counter_uniform

VOCAB = 4
GAMMA = 3
BISECTION_STEPS = 60
EXACT = 1e-12


@dataclass(frozen=True)
class RowCase:
    """One kind of row: its sampling parameters (shared by draft and target, as in the engine), how many tokens it
    drafts, and the seeds of its draft's and target's logits tables."""

    params: SamplingParams
    count: int
    seed: int


# Rows with different counts and filters share one batch; each filter combination appears where it bites.
ROW_CASES = (
    RowCase(SamplingParams(temperature=1.0), 3, 0),
    RowCase(SamplingParams(temperature=0.7, top_k=3, top_p=0.9), 3, 1),
    RowCase(SamplingParams(temperature=1.3, top_p=0.8), 2, 2),
    RowCase(SamplingParams(temperature=0.9, top_k=2), 1, 3),
    RowCase(SamplingParams(temperature=0.8, top_k=3, top_p=0.7), 2, 4),
    RowCase(SamplingParams(temperature=1.0, top_k=3, top_p=0.75), 3, 5),
    RowCase(SamplingParams(temperature=1.0), 0, 6),
    RowCase(SamplingParams(), 3, 7),
)


def context_logits(seed: int, role: int, prefix: tuple[int, ...]) -> torch.Tensor:
    """Logits after `prefix` (the tokens drafted so far), different for every prefix: p and q depend on the draft,
    as a real model's do. `role` tells draft (0) from target (1)."""
    key = sum(token * (VOCAB + 1) ** index for index, token in enumerate((*prefix, VOCAB)))
    generator = torch.Generator().manual_seed(1_000_003 * seed + 7 * key + role)
    return torch.randn(VOCAB, generator=generator, dtype=torch.float64) * 1.5


def as_stored(params: SamplingParams) -> SamplingParams:
    """The parameters as `RowSampling` holds them: temperature and top-p as float32 (T = 0.7 becomes 0.699999988,
    on the draft's side and the target's alike). The reference uses these values, so that everything else can be
    compared to float64 rounding."""

    def float32(value: float | None) -> float | None:
        return None if value is None else float(torch.tensor(value, dtype=torch.float32))

    return SamplingParams(float32(params.temperature), params.top_k, float32(params.top_p))


def reference_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return warped_probabilities(logits, as_stored(params))


def reference_conditional(case: RowCase, role: int) -> Conditional:
    """The reference's distribution of the draft (role 0) or target (role 1) after each prefix (memoised: the
    enumeration asks for each prefix many times)."""

    @functools.cache
    def conditional(prefix: tuple[int, ...]) -> list[float]:
        return reference_probabilities(context_logits(case.seed, role, prefix), case.params).tolist()

    return conditional


def reference_law(case: RowCase) -> dict[tuple[int, ...], float]:
    return speculative_step_law(reference_conditional(case, 1), reference_conditional(case, 0), case.count, VOCAB)


@dataclass(frozen=True)
class Batch:
    """Every draft sequence of every case as one row of one batch, with the engine's p and q for it."""

    owners: list[int]
    drafts: torch.Tensor
    counts: torch.Tensor
    draft_probs: torch.Tensor
    target_probs: torch.Tensor


def build_batch(cases: tuple[RowCase, ...]) -> Batch:
    owners, drafts, counts, draft_logits, target_logits = [], [], [], [], []
    for index, case in enumerate(cases):
        for sequence in itertools.product(range(VOCAB), repeat=case.count):
            owners.append(index)
            drafts.append([*sequence, *[0] * (GAMMA - case.count)])
            counts.append(case.count)
            padded = torch.zeros(VOCAB, dtype=torch.float64)
            draft_logits.append(
                [context_logits(case.seed, 0, sequence[:j]) if j < case.count else padded for j in range(GAMMA)]
            )
            target_logits.append(
                [context_logits(case.seed, 1, sequence[:j]) if j <= case.count else padded for j in range(GAMMA + 1)]
            )
    row_params = [cases[owner].params for owner in owners]
    row_sampling = RowSampling.build(row_params, list(range(len(owners))), torch.device("cpu"))
    return Batch(
        owners,
        torch.tensor(drafts, dtype=torch.long),
        torch.tensor(counts, dtype=torch.long),
        sampling.row_probabilities(torch.stack([torch.stack(row) for row in draft_logits]), row_sampling),
        sampling.row_probabilities(torch.stack([torch.stack(row) for row in target_logits]), row_sampling),
    )


def forced_uniforms(rows: int, accept_before: int, value: torch.Tensor | float) -> torch.Tensor:
    """u = 0 (accept whenever p > 0) before `accept_before`, `value` there, u = 1 after (irrelevant)."""
    uniforms = torch.ones(rows, GAMMA, dtype=torch.float64)
    uniforms[:, :accept_before] = 0
    if accept_before < GAMMA:
        uniforms[:, accept_before] = value
    return uniforms


def acceptance_probabilities(batch: Batch, draft_probs: torch.Tensor | None) -> torch.Tensor:
    """(rows, γ): the length of the interval of u_j on which the rule accepts draft j, given it accepted the earlier
    ones — the probability of accepting draft j, integrated over u_j exactly (up to 2^-60) by bisection."""
    rows = len(batch.owners)
    columns = []
    for position in range(GAMMA):
        low = torch.zeros(rows, dtype=torch.float64)
        high = torch.ones(rows, dtype=torch.float64)
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            uniforms = forced_uniforms(rows, position, middle)
            accepted, _ = verify.stochastic_accept(
                batch.drafts, batch.counts, draft_probs, batch.target_probs, uniforms
            )
            passes = accepted > position
            low, high = torch.where(passes, middle, low), torch.where(passes, high, middle)
        columns.append(low)
    return torch.stack(columns, 1)


def row_laws(batch: Batch, draft_probs: torch.Tensor | None) -> list[dict[tuple[int, ...], float]]:
    """Per row (one fixed draft sequence), the law of the tokens `stochastic_accept` lets the step emit, integrated
    over its uniforms: P(stop after a drafts) × the distribution it returns there, for every a. `draft_probs` None
    means one-hot q, as for prompt lookup."""
    keep = acceptance_probabilities(batch, draft_probs)
    laws: list[dict[tuple[int, ...], float]] = [{} for _ in batch.owners]
    for stop in range(GAMMA + 1):
        uniforms = forced_uniforms(len(batch.owners), stop, 1.0)
        accepted, next_distribution = verify.stochastic_accept(
            batch.drafts, batch.counts, draft_probs, batch.target_probs, uniforms
        )
        reach = keep[:, :stop].prod(1)
        stops_here = torch.where(stop < batch.counts, 1 - keep[:, min(stop, GAMMA - 1)], 1.0)
        for row, law in enumerate(laws):
            mass = float(reach[row] * stops_here[row])
            if stop > batch.counts[row] or mass == 0:
                continue
            assert int(accepted[row]) == stop, "u = 1 must reject wherever rejecting has positive probability"
            kept = tuple(batch.drafts[row, :stop].tolist())
            for token, probability in enumerate(next_distribution[row].tolist()):
                if probability > 0:
                    law[(*kept, token)] = law.get((*kept, token), 0.0) + mass * probability
    return laws


def case_laws(batch: Batch, cases: tuple[RowCase, ...]) -> list[dict[tuple[int, ...], float]]:
    """Each case's law: its rows' laws weighted by q(x), the probability the draft samples their sequence."""
    drafted = batch.draft_probs.gather(2, batch.drafts[:, :, None]).squeeze(2)
    weights = torch.where(torch.arange(GAMMA)[None, :] < batch.counts[:, None], drafted, 1.0).prod(1).tolist()
    laws: list[dict[tuple[int, ...], float]] = [{} for _ in cases]
    for owner, weight, law in zip(batch.owners, weights, row_laws(batch, batch.draft_probs), strict=True):
        for outcome, mass in law.items():
            laws[owner][outcome] = laws[owner].get(outcome, 0.0) + weight * mass
    return laws


def rule_law_gap() -> float:
    """The criterion: the largest gap between the rule's exact law and the reference's, over every case."""
    laws = case_laws(build_batch(ROW_CASES), ROW_CASES)
    return max(law_gap(law, reference_law(case)) for law, case in zip(laws, ROW_CASES, strict=True))


def deterministic_proposal_gap() -> float:
    """The criterion for drafts proposed without probabilities (q one-hot at each drafted token): every draft
    sequence of the cases that draft, each its own row, against the reference with that one-hot q."""
    cases = tuple(case for case in ROW_CASES if case.count)
    batch = build_batch(cases)
    worst = 0.0
    for row, law in enumerate(row_laws(batch, None)):
        case = cases[batch.owners[row]]
        sequence = tuple(batch.drafts[row, : case.count].tolist())

        def one_hot_draft(prefix, sequence=sequence):
            return [float(token == sequence[len(prefix)]) for token in range(VOCAB)]

        reference = speculative_step_law(reference_conditional(case, 1), one_hot_draft, case.count, VOCAB)
        worst = max(worst, law_gap(law, reference))
    return worst


FILTER_SETTINGS = (
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.6),
    SamplingParams(temperature=1.4, top_k=3, top_p=0.9),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.5),
    SamplingParams(),
)


def filtering_gap() -> float:
    """The criterion for filtering: the largest difference between `row_probabilities` (every setting a row of one
    batch) and transformers' warpers, over 200 random logit vectors of 12 tokens."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(FILTER_SETTINGS), 200, 12, generator=generator, dtype=torch.float64) * 2
    row_sampling = RowSampling.build(FILTER_SETTINGS, range(len(FILTER_SETTINGS)), torch.device("cpu"))
    ours = sampling.row_probabilities(logits, row_sampling)
    theirs = torch.stack(
        [reference_probabilities(row, params) for row, params in zip(logits, FILTER_SETTINGS, strict=True)]
    )
    return float((ours - theirs).abs().max())


def test_reference_law_is_the_target_law():
    """The enumerated reference obeys the theorem: a step's output continued by the target is the target alone."""
    for case in ROW_CASES:
        target = reference_conditional(case, 1)
        assert target_law_of_prefixes(target, reference_law(case), case.count + 1, VOCAB) < EXACT


def test_cases_reject_at_every_draft_position_with_spread_q():
    """The cases exercise what matters: rejections are possible at every position and q is not one-hot."""
    batch = build_batch(ROW_CASES)
    keep = acceptance_probabilities(batch, batch.draft_probs)
    within = torch.arange(GAMMA)[None, :] < batch.counts[:, None]
    spread = (batch.draft_probs > 0).sum(-1) >= 2
    for position in range(GAMMA):
        assert bool(((keep[:, position] < 0.5) & within[:, position]).any())
        assert bool((spread[:, position] & within[:, position]).any())


def test_stochastic_accept_law_equals_reference():
    assert rule_law_gap() < EXACT


def test_deterministic_proposals_law_equals_reference():
    assert deterministic_proposal_gap() < EXACT


def test_row_probabilities_filter_as_transformers_warpers():
    assert filtering_gap() < EXACT


def test_sample_draws_each_token_with_its_probability():
    """The exponential race behind `sample`, over 300,000 draws: within 5 standard deviations of each probability,
    and never a token of probability 0."""
    probs = torch.tensor([0.05, 0.0, 0.45, 0.2, 0.3], dtype=torch.float64)
    draws = 300_000
    uniforms = counter_uniform(torch.full((draws,), 11), torch.arange(draws), 3, probs.shape[0])
    frequencies = torch.bincount(sampling.sample(probs.expand(draws, -1), uniforms), minlength=5).double() / draws
    assert frequencies[1] == 0
    assert ((frequencies - probs).abs() < 5 * (probs * (1 - probs) / draws).sqrt() + 1e-12).all()
