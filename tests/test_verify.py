"""The acceptance rule on its own, over the rows of a batch: exhaustive small cases and exact distributions."""

from __future__ import annotations

import itertools

import pytest
import torch

from speculor.sampling import RowSampling, SamplingParams, counter_uniform, probabilities, row_probabilities, sample
from speculor.verify import greedy_accept, stochastic_accept


def one_hot_logits(tokens: list[int], vocab: int = 5) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 3.0
    return logits


def accept_one_row(drafts: list[int], choices: list[int], vocab: int = 5) -> tuple[int, int]:
    count, token = greedy_accept(
        torch.tensor([drafts], dtype=torch.long).view(1, -1),
        torch.tensor([len(drafts)]),
        one_hot_logits(choices, vocab)[None],
    )
    return int(count[0]), int(token[0])


@pytest.mark.parametrize(
    ("drafts", "target_choices", "accepted", "next_token"),
    [
        ([1, 2, 3], [1, 2, 3, 4], 3, 4),  # all accepted: bonus token from position γ+1
        ([1, 2, 3], [0, 2, 3, 4], 0, 0),  # first rejected
        ([1, 2, 3], [1, 2, 0, 4], 2, 0),  # later ones are not looked at after a rejection
        ([1, 9 % 5, 3], [1, 0, 3, 4], 1, 0),
        ([], [2], 0, 2),  # nothing drafted: a plain decoding step
    ],
)
def test_greedy_accept_keeps_longest_matching_prefix(drafts, target_choices, accepted, next_token):
    assert accept_one_row(drafts, target_choices) == (accepted, next_token)


def test_greedy_accept_rows_with_ragged_counts_ignore_padding():
    """Rows of one batch draft different numbers of tokens; padding matching the target is never accepted."""
    drafts = torch.tensor([[1, 2, 3], [1, 2, 0], [4, 0, 0]])
    counts = torch.tensor([3, 2, 0])
    logits = torch.stack([one_hot_logits([1, 2, 3, 4]), one_hot_logits([1, 2, 0, 1]), one_hot_logits([4, 0, 0, 0])])
    accepted, tokens = greedy_accept(drafts, counts, logits)
    assert accepted.tolist() == [3, 2, 0]
    assert tokens.tolist() == [4, 0, 4]


def emitted_distribution(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Exact distribution of the first token emitted by one speculative step with γ = 1, enumerated by hand:
    draft x ~ q; keep x with prob min(1, p/q); else draw from normalize(max(0, p − q))."""
    keep = torch.minimum(torch.ones_like(p), p / q)
    residual = (p - q).clamp_min(0)
    residual = residual / residual.sum()
    reject_mass = (q * (1 - keep)).sum()
    return q * keep + reject_mass * residual


def test_rule_algebra_reproduces_target_distribution():
    torch.manual_seed(0)
    for _ in range(20):
        p = torch.rand(6, dtype=torch.float64).softmax(0)
        q = (torch.rand(6, dtype=torch.float64) * 3).softmax(0)
        assert torch.allclose(emitted_distribution(q, p), p)


def first_tokens(q: torch.Tensor, p: torch.Tensor, rule, samples: int) -> torch.Tensor:
    """Frequencies of the first emitted token over `samples` rows of one batch, each row its own seed."""
    seeds = torch.arange(samples, dtype=torch.long)
    zeros = torch.zeros(samples, dtype=torch.long)
    vocab = p.shape[0]
    drafts = sample(q.expand(samples, vocab), counter_uniform(seeds, zeros, 1, vocab))[:, None]
    accepted, distribution = rule(
        drafts,
        torch.ones(samples, dtype=torch.long),
        q.expand(samples, 1, vocab),
        p.expand(samples, 2, vocab),
        counter_uniform(seeds, zeros[:, None], 2),
    )
    residual_tokens = sample(distribution, counter_uniform(seeds, accepted, 3, vocab))
    emitted = torch.where(accepted.bool(), drafts[:, 0], residual_tokens)
    return torch.bincount(emitted, minlength=vocab).double() / samples


def broken_accept(draft_tokens, counts, draft_probs, target_probs, uniforms):
    """A plausible-looking wrong rule: at a rejection, resample from p instead of the residual max(0, p − q)."""
    accepted, _ = stochastic_accept(draft_tokens, counts, draft_probs, target_probs, uniforms)
    return accepted, target_probs[torch.arange(len(accepted)), accepted]


def test_stochastic_accept_first_token_matches_p_and_broken_rule_does_not():
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05], dtype=torch.float64)
    q = torch.tensor([0.05, 0.1, 0.6, 0.2, 0.05], dtype=torch.float64)
    samples = 20000
    good = first_tokens(q, p, stochastic_accept, samples)
    bad = first_tokens(q, p, broken_accept, samples)
    tolerance = 4 * (0.25 / samples) ** 0.5  # four standard deviations of a frequency
    assert (good - p).abs().max() < tolerance
    assert (bad - p).abs().max() > 3 * tolerance


def test_deterministic_proposal_is_one_hot_q():
    """With q one-hot (prompt lookup), x is kept with probability p(x) and the residual is p without x."""
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    rows = 4000
    uniforms = counter_uniform(torch.arange(rows), torch.zeros(rows, 1, dtype=torch.long), 2)
    drafts = torch.zeros(rows, 1, dtype=torch.long)
    accepted, residual = stochastic_accept(
        drafts, torch.ones(rows, dtype=torch.long), None, p.expand(rows, 2, 3), uniforms
    )
    assert abs(accepted.double().mean() - 0.6) < 0.03
    rejected = residual[accepted == 0]
    assert torch.all(rejected[:, 0] == 0)
    assert torch.allclose(rejected[0], torch.tensor([0.0, 0.75, 0.25], dtype=torch.float64))


def test_bonus_token_comes_from_last_position():
    p = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    q = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    uniforms = torch.full((1, 1), 0.5, dtype=torch.float64)
    accepted, distribution = stochastic_accept(torch.tensor([[0]]), torch.tensor([1]), q, p, uniforms)
    assert int(accepted[0]) == 1
    assert distribution[0].tolist() == [0.0, 0.0, 1.0]


def test_probabilities_top_k_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    full = logits.softmax(0)
    top_k = probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top_k, torch.cat([full[:2] / full[:2].sum(), torch.zeros(3)]))
    # top_p keeps the smallest prefix whose mass reaches top_p.
    threshold = float(full[:2].sum()) - 1e-6
    top_p = probabilities(logits, SamplingParams(temperature=1.0, top_p=threshold))
    assert torch.count_nonzero(top_p) == 2
    cooled = probabilities(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(cooled, (logits / 0.5).softmax(0))
    greedy = probabilities(logits, SamplingParams())
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_row_probabilities_give_each_row_its_own_parameters():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 7)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=2),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=1.0),
    ]
    together = row_probabilities(logits, RowSampling.build(params, [0, 1, 2, 3], logits.device))
    for row, one in enumerate(params):
        assert torch.allclose(together[row], probabilities(logits[row], one))


def test_exponential_race_sampling_matches_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    rows = 20000
    uniforms = counter_uniform(torch.full((rows,), 5), torch.arange(rows), 3, 4)
    draws = sample(probs.expand(rows, 4), uniforms)
    frequencies = torch.bincount(draws, minlength=4).double() / rows
    assert (frequencies - probs).abs().max() < 0.015


def test_counter_uniform_is_uniform_and_keyed():
    seeds = torch.arange(64)
    values = counter_uniform(seeds, torch.arange(64), 1, 512)
    assert float(values.min()) > 0 and float(values.max()) < 1
    histogram = torch.histc(values.float(), bins=16, min=0, max=1) / values.numel()
    assert (histogram - 1 / 16).abs().max() < 0.005
    again = counter_uniform(seeds[:3], torch.arange(3), 1, 512)
    assert torch.equal(again, values[:3])
    assert not torch.equal(counter_uniform(seeds, torch.arange(64), 2, 512), values)


def test_greedy_accept_exhaustive_against_reference():
    """Every draft/target combination over a 3-token vocabulary with γ = 2."""
    for drafts in itertools.product(range(3), repeat=2):
        for choices in itertools.product(range(3), repeat=3):
            expected = 0
            while expected < 2 and drafts[expected] == choices[expected]:
                expected += 1
            assert accept_one_row(list(drafts), list(choices), vocab=3) == (expected, choices[expected])


def test_rejection_after_accepted_drafts_takes_the_residual_at_the_rejected_position():
    """Draft 0 accepted, draft 1 rejected: the next token comes from normalize(max(0, p₁ − q₁)), with q of position
    1 (not of position 0), q spread over several tokens; a second row drafting one token gets the bonus from p₁."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.3, 0.2, 0.5], [0.3, 0.3, 0.4]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.4, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    accepted, distribution = stochastic_accept(
        torch.tensor([[0, 1], [0, 0]]),
        torch.tensor([2, 1]),
        q.expand(2, 2, 3),
        p.expand(2, 3, 3),
        torch.tensor([[0.5, 0.9], [0.5, 0.9]], dtype=torch.float64),
    )
    assert accepted.tolist() == [1, 1]
    # max(0, p₁ − q₁) = (0.2, 0, 0.2); with q₀ instead it would be (0, 0, 0.3).
    assert torch.allclose(distribution[0], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))
    assert torch.allclose(distribution[1], p[1])
