import pytest
import torch

from speculor import SpeculativeDecoder
from speculor.adaptive import ConfidenceThreshold, FixedGamma, LeviathanGamma
from speculor.errors import SpeculorError

PROMPT = [5, 17, 3, 42, 8, 11]


def decoder(target, draft) -> SpeculativeDecoder:
    return SpeculativeDecoder(target, draft, device="cpu", dtype=torch.float64, runner="hf")


def test_leviathan_gamma_follows_the_acceptance_estimate():
    policy = LeviathanGamma(max_gamma=8, cost_ratio=0.1)
    # Prior α = 0.6 at c = 0.1: speedups 1.455, 1.633, 1.674, 1.647 for γ = 1..4.
    assert policy.alpha == pytest.approx(0.6)
    assert policy.next_gamma() == 3
    for _ in range(60):
        policy.observe(drafted=policy.next_gamma(), accepted=policy.next_gamma())
    assert policy.alpha > 0.99
    assert policy.next_gamma() == 8
    for _ in range(60):
        policy.observe(drafted=policy.next_gamma(), accepted=0)
    assert policy.alpha < 0.05
    assert policy.next_gamma() == 1


def test_leviathan_gamma_counts_a_fully_accepted_step_without_a_failure():
    policy = LeviathanGamma(max_gamma=4, cost_ratio=0.0, decay=1.0, prior_alpha=0.5, prior_weight=2.0)
    policy.observe(drafted=4, accepted=4)
    policy.observe(drafted=4, accepted=1)
    # successes 1 + 4 + 1 = 6, trials 2 + 4 + (1 + 1) = 8.
    assert policy.alpha == pytest.approx(0.75)


def test_expensive_draft_keeps_gamma_short():
    cheap, costly = LeviathanGamma(8, cost_ratio=0.05), LeviathanGamma(8, cost_ratio=0.6)
    for policy in (cheap, costly):
        for _ in range(20):
            policy.observe(drafted=4, accepted=3)
    assert cheap.alpha == pytest.approx(costly.alpha)
    assert costly.next_gamma() < cheap.next_gamma()


def test_policies_reject_bad_settings():
    with pytest.raises(SpeculorError, match="max_gamma"):
        ConfidenceThreshold(0, 0.5)
    with pytest.raises(SpeculorError, match="threshold"):
        ConfidenceThreshold(4, 1.5)
    with pytest.raises(SpeculorError, match="cost ratio"):
        LeviathanGamma(4, cost_ratio=-0.1)


@pytest.mark.parametrize(
    ("make_policy", "same_model_draft"),
    [
        (lambda: ConfidenceThreshold(5, 0.05), False),
        (lambda: ConfidenceThreshold(5, 0.9), True),
        (lambda: LeviathanGamma(6, cost_ratio=0.2), False),
    ],
)
def test_adaptive_policies_keep_greedy_output_identical(llama_pair, make_policy, same_model_draft):
    target, draft = llama_pair
    dec = decoder(target, target if same_model_draft else draft)
    alone = dec.generate(PROMPT, max_new_tokens=24, ignore_eos=True, speculative=False)
    result = dec.generate(PROMPT, max_new_tokens=24, ignore_eos=True, gamma=make_policy())
    assert result.token_ids == alone.token_ids
    assert result.stats.drafted > 0


def test_confidence_threshold_ends_steps_early(llama_pair):
    target, draft = llama_pair
    dec = decoder(target, draft)
    never = dec.generate(PROMPT, max_new_tokens=20, ignore_eos=True, gamma=ConfidenceThreshold(4, 0.0)).stats
    always = dec.generate(PROMPT, max_new_tokens=20, ignore_eos=True, gamma=ConfidenceThreshold(4, 1.0)).stats
    fixed = dec.generate(PROMPT, max_new_tokens=20, ignore_eos=True, gamma=FixedGamma(4)).stats
    assert never.drafted_by_position == fixed.drafted_by_position
    # No token is drafted with probability above 1, so every step stops after its first draft.
    assert len(always.drafted_by_position) == 1
    assert always.drafted == always.draft_forwards == always.target_forwards - 1


def test_leviathan_gamma_grows_when_the_draft_is_the_target(llama_pair):
    target, _ = llama_pair
    policy = LeviathanGamma(6, cost_ratio=0.1)
    dec = decoder(target, target)
    alone = dec.generate(PROMPT, max_new_tokens=40, ignore_eos=True, speculative=False)
    result = dec.generate(PROMPT, max_new_tokens=40, ignore_eos=True, gamma=policy)
    stats = result.stats
    assert result.token_ids == alone.token_ids
    assert stats.acceptance_rate == 1.0
    assert len(stats.drafted_by_position) == 6
    assert policy.next_gamma() == 6
