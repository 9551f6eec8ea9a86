"""The exactness criteria have the power to catch small errors: each known-wrong rule below — the plausible slips an
audit made on purpose — is swapped into speculor and must be rejected by the criterion that guards it, by a margin
of many orders of magnitude over the tolerance the correct rules pass with (tests/test_acceptance_reference.py).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import pytest
import torch
from test_acceptance_reference import EXACT, deterministic_proposal_gap, filtering_gap, rule_law_gap

from speculor import sampling, verify

correct_accept = verify.stochastic_accept
correct_probabilities = sampling.row_probabilities
# A mutant must miss by this much at least: a thousand million times the tolerance.
REJECTED = 1e-3


def residual_at_previous_position(draft_tokens, counts, draft_probs, target_probs, uniforms):
    """Wrong: after a rejection at position i ≥ 1, the residual subtracts q of position i − 1."""
    accepted, _ = correct_accept(draft_tokens, counts, draft_probs, target_probs, uniforms)
    if draft_probs is None:
        draft_probs = torch.nn.functional.one_hot(draft_tokens, target_probs.shape[-1])
    rows = torch.arange(len(accepted))
    p_next = target_probs[rows, accepted]
    q_previous = draft_probs.to(p_next.dtype)[rows, (accepted - 1).clamp(min=0)]
    leftover = (p_next - torch.where((accepted < counts)[:, None], q_previous, 0)).clamp_min(0)
    total = leftover.sum(-1, keepdim=True)
    return accepted, torch.where(total > 0, leftover / total.clamp_min(1e-300), p_next)


def accept_ten_percent_more(draft_tokens, counts, draft_probs, target_probs, uniforms):
    """Wrong: accepts when u·q < 1.1·p, a 10% over-acceptance."""
    return correct_accept(draft_tokens, counts, draft_probs, target_probs, uniforms / 1.1)


def resample_from_target(draft_tokens, counts, draft_probs, target_probs, uniforms):
    """Wrong: at a rejection, samples from p instead of the residual normalize(max(0, p − q))."""
    accepted, _ = correct_accept(draft_tokens, counts, draft_probs, target_probs, uniforms)
    return accepted, target_probs[torch.arange(len(accepted)), accepted]


def top_p_before_top_k(logits, row_sampling):
    """Wrong: the nucleus is cut from the full distribution, then top-k applied (Hugging Face does top-k first)."""
    if not row_sampling.filtered:
        return correct_probabilities(logits, row_sampling)
    no_top_k = dataclasses.replace(row_sampling, top_k=torch.zeros_like(row_sampling.top_k))
    nucleus = correct_probabilities(logits, no_top_k)
    unit_temperature = torch.where(row_sampling.temperature > 0, 1.0, 0.0)
    only_top_k = dataclasses.replace(
        row_sampling, temperature=unit_temperature, top_p=torch.ones_like(row_sampling.top_p)
    )
    return correct_probabilities(nucleus.log(), only_top_k)


def install(monkeypatch: pytest.MonkeyPatch, original: Callable, replacement: Callable) -> None:
    """Put `replacement` wherever speculor holds `original`: its own module and every speculor module that
    imported it by name (the engine imports both rules so)."""
    name = original.__name__
    holders = [
        module
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("speculor") and getattr(module, name, None) is original
    ]
    assert holders, name
    for module in holders:
        monkeypatch.setattr(module, name, replacement)


MUTANTS = [
    pytest.param(
        correct_accept,
        residual_at_previous_position,
        (rule_law_gap, deterministic_proposal_gap),
        id="residual-at-previous-position",
    ),
    pytest.param(
        correct_accept, accept_ten_percent_more, (rule_law_gap, deterministic_proposal_gap), id="over-acceptance"
    ),
    pytest.param(
        correct_accept, resample_from_target, (rule_law_gap, deterministic_proposal_gap), id="resample-from-p"
    ),
    pytest.param(correct_probabilities, top_p_before_top_k, (filtering_gap, rule_law_gap), id="top-p-before-top-k"),
]


@pytest.mark.parametrize(("original", "mutant", "criteria"), MUTANTS)
def test_known_wrong_rule_is_rejected(monkeypatch, original, mutant, criteria):
    install(monkeypatch, original, mutant)
    for criterion in criteria:
        assert criterion() > REJECTED, criterion.__name__


def test_correct_rules_pass_the_same_criteria():
    assert verify.stochastic_accept is correct_accept and sampling.row_probabilities is correct_probabilities
    for criterion in (rule_law_gap, deterministic_proposal_gap, filtering_gap):
        assert criterion() < EXACT, criterion.__name__
