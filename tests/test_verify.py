"""The acceptance rule on its own: exhaustive small cases and exact distributions."""

from __future__ import annotations

import itertools

import pytest
import torch

from speculor.sampling import SamplingParams, probabilities, sample
from speculor.verify import greedy_accept, stochastic_accept


def one_hot_logits(tokens: list[int], vocab: int = 5) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 3.0
    return logits


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
    count, token = greedy_accept(torch.tensor(drafts, dtype=torch.long), one_hot_logits(target_choices))
    assert (int(count), int(token)) == (accepted, next_token)


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


def empirical_first_token(draft_probs, target_probs, rule, samples: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(target_probs.shape[-1], dtype=torch.float64)
    for _ in range(samples):
        draft = sample(draft_probs[0], generator).view(1)
        accepted, token = rule(draft, draft_probs, target_probs, generator)
        counts[int(draft) if int(accepted) else int(token)] += 1
    return counts / samples


def broken_accept(draft_tokens, draft_probs, target_probs, generator):
    """A plausible-looking wrong rule: at a rejection, resample from p instead of the residual max(0, p − q)."""
    accepted, _ = stochastic_accept(draft_tokens, draft_probs, target_probs, generator)
    return accepted, sample(target_probs[accepted], generator)


def test_stochastic_accept_first_token_matches_p_and_broken_rule_does_not():
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05], dtype=torch.float64)
    q = torch.tensor([0.05, 0.1, 0.6, 0.2, 0.05], dtype=torch.float64)
    target_probs = torch.stack([p, p])
    draft_probs = q.view(1, -1)
    samples = 6000
    good = empirical_first_token(draft_probs, target_probs, stochastic_accept, samples)
    bad = empirical_first_token(draft_probs, target_probs, broken_accept, samples)
    tolerance = 4 * (0.25 / samples) ** 0.5  # four standard deviations of a frequency
    assert (good - p).abs().max() < tolerance
    assert (bad - p).abs().max() > 3 * tolerance


def test_deterministic_proposal_is_one_hot_q():
    """With q one-hot (prompt lookup), x is kept with probability p(x) and the residual is p without x."""
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    kept = sum(int(stochastic_accept(torch.tensor([0]), None, p, generator)[0]) for _ in range(4000))
    assert abs(kept / 4000 - 0.6) < 0.03
    for _ in range(200):
        accepted, token = stochastic_accept(torch.tensor([0]), None, p, generator)
        if int(accepted) == 0:
            assert int(token) != 0


def test_bonus_token_comes_from_last_position():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    accepted, token = stochastic_accept(torch.tensor([0]), q, p, torch.Generator().manual_seed(0))
    assert (int(accepted), int(token)) == (1, 2)


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


def test_exponential_race_sampling_matches_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    draws = sample(probs.expand(20000, 4).contiguous(), generator)
    frequencies = torch.bincount(draws, minlength=4).double() / 20000
    assert (frequencies - probs).abs().max() < 0.015


def test_greedy_accept_exhaustive_against_reference():
    """Every draft/target combination over a 3-token vocabulary with γ = 2."""
    for drafts in itertools.product(range(3), repeat=2):
        for choices in itertools.product(range(3), repeat=3):
            expected = 0
            while expected < 2 and drafts[expected] == choices[expected]:
                expected += 1
            count, token = greedy_accept(torch.tensor(drafts), one_hot_logits(list(choices), vocab=3))
            assert (int(count), int(token)) == (expected, choices[expected])
