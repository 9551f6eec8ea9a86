import pytest
import torch

from speculor import SpeculativeDecoder
from speculor.adaptive import ConfidenceThreshold, FixedGamma, LeviathanGamma, LoadAwareGamma
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
    # Neither the first step (the first token is the target's alone) nor the last (one token left) drafts.
    assert always.drafted == always.draft_forwards == always.target_forwards - 2


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


def learned_policy(verify_cost, draft_pass: float, acceptance: float, batch: int, max_gamma: int = 6):
    """A load-aware policy that has seen steps of every γ at `batch` rows (verify_cost(width) seconds for the target,
    draft_pass a draft pass) and rows accepting each position with probability `acceptance` (counts, not samples)."""
    policy = LoadAwareGamma(max_gamma)
    for gamma in range(max_gamma + 1):
        verify = verify_cost(gamma + 1)
        policy.observe(batch, gamma, gamma, gamma * draft_pass, verify, verify + gamma * draft_pass + 0.0005)
    for index in range(1000):
        accepted = int((index + 1) * acceptance) - int(index * acceptance)
        policy.observe_acceptance("greedy", [(1, accepted)])
    return policy


def test_load_aware_gamma_speculates_when_verify_is_free_and_stops_when_it_is_not():
    free = learned_policy(lambda width: 0.01, 0.001, 0.8, batch=1)
    free.DECIDE_EVERY = 1
    assert free.choose(["greedy"], [6]) >= 3
    assert free.choose(["greedy"], [1]) == 1
    busy = learned_policy(lambda width: 0.01 * max(1.0, 64 * width / 16), 0.001, 0.8, batch=64)
    assert busy.choose(["greedy"] * 64, [6] * 64) == 0
    useless = learned_policy(lambda width: 0.01, 0.001, 0.05, batch=2)
    assert useless.choose(["greedy"] * 2, [6] * 2) == 0


def test_load_aware_gamma_predicts_every_gamma_from_two_and_corrects_a_hopeful_guess():
    """After one step without drafting and one drafting 2, every γ is predicted — hopefully: a pass count not yet
    run costs what the nearest one did — and a γ whose real cost is far above that is dropped once it has run."""
    policy = LoadAwareGamma(6)
    policy.DECIDE_EVERY = 1
    policy.observe(1, 0, 0, 0.0, 0.010, 0.011)
    policy.observe(1, 2, 2, 0.004, 0.010, 0.015)
    assert policy.step_seconds(1, 4) == pytest.approx(0.001 + 0.004 + 0.010)
    policy.observe(1, 4, 4, 0.008, 0.010, 0.019)
    assert policy.step_seconds(1, 3) == pytest.approx(0.001 + 0.006 + 0.010)
    for _ in range(50):
        policy.observe_acceptance("greedy", [(6, 6)])
    assert policy.choose(["greedy"], [6]) == 6
    for _ in range(20):
        policy.observe(1, 6, 6, 0.2, 0.010, 0.211)
    assert policy.choose(["greedy"], [6]) < 6


def test_load_aware_gamma_learns_acceptance_by_position():
    policy = LoadAwareGamma(6)
    for _ in range(200):
        policy.observe_acceptance("greedy", [(4, 1)])  # the first draft always passes, the second never
    rates = policy.acceptance["greedy"].rates(4)
    assert rates[0] > 0.95 and rates[1] < 0.05
    assert policy.acceptance["greedy"].expected_tokens(4) == pytest.approx(2.0, abs=0.1)


def test_load_aware_gamma_explores_the_neighbour_of_its_choice():
    policy = learned_policy(lambda width: 0.01, 0.001, 0.7, batch=1)
    policy.DECIDE_EVERY = 1
    choices = [policy.choose(["greedy"], [6]) for _ in range(8 * LoadAwareGamma.EXPLORE_EVERY)]
    best = max(set(choices), key=choices.count)
    assert set(choices) - {best}, "a neighbour is tried now and then"
    assert choices.count(best) >= len(choices) * 0.7


def test_the_first_token_never_waits_for_the_draft(llama_pair):
    target, draft = llama_pair
    speculative = SpeculativeDecoder(target, draft, device="cpu", dtype=torch.float64)
    engine = speculative.new_engine()
    request_id = engine.add(speculative.request(PROMPT, max_new_tokens=8, gamma=4))
    events = []
    while not events:
        events = [event for event in engine.step() if event.request_id == request_id and event.delta.token_ids]
    assert len(events[0].delta.token_ids) == 1
    assert engine.proposer.runner.length(0) == 0, "the draft did not even read the prompt before the first token"


def test_a_load_aware_decision_stands_for_several_steps_of_the_same_batch():
    policy = learned_policy(lambda width: 0.01, 0.001, 0.8, batch=2)
    first = policy.choose(["greedy"] * 2, [6] * 2)
    for _ in range(20):
        policy.observe(2, first, first, 1.0, 0.01, 1.02)  # the chosen γ turns out very slow
    assert [policy.choose(["greedy"] * 2, [6] * 2) for _ in range(LoadAwareGamma.DECIDE_EVERY - 1)] == [first] * 7
    assert policy.choose(["greedy"] * 2, [6] * 2) != first, "the next decision sees the new costs"


def test_draft_catch_ups_are_charged_to_speculating_steps_on_average():
    """A row joining (its prompt fed to the draft) or speculation resuming (the tokens drafted without) makes the draft
    phase longer once; the policy charges that to speculating steps on average, not to drafting or host work."""
    policy = learned_policy(lambda width: 0.01, 0.001, 0.8, batch=4)
    before = policy.step_seconds(4, 3)
    for index in range(40):
        caught_up = index % 4 == 0
        draft = 0.003 + (0.02 if caught_up else 0.0)
        policy.observe(4, 3, 3, draft, 0.01, 0.0105 + draft, caught_up)
    assert policy.step_seconds(4, 3) > before + 0.002
    assert policy.step_seconds(4, 0) == pytest.approx(0.0105)
    assert policy.snapshot()["buckets"][4]["draft_by_passes"][3] == pytest.approx(0.003)


def test_a_gamma_measured_while_queued_costs_what_it_took_then():
    """Once steps of a γ ran queued behind the step before, that is their cost (none of the host's work shows); a γ
    never run queued is still predicted from its phases. So AR's pipelined step is the arm speculation must beat."""
    policy = learned_policy(lambda width: 0.01, 0.002, 0.8, batch=16)
    policy.DECIDE_EVERY = 1
    assert policy.step_seconds(16, 3) == pytest.approx(0.0005 + 0.006 + 0.01)
    policy.observe_pipelined(16, 3, 0.012)
    policy.observe_pipelined(16, 0, 0.004)
    assert policy.step_seconds(16, 3) == pytest.approx(0.012)
    assert policy.step_seconds(16, 0) == pytest.approx(0.004)
    assert policy.step_seconds(16, 2) == pytest.approx(0.0005 + 0.004 + 0.01)
    assert policy.snapshot()["buckets"][16]["pipelined_by_gamma"] == {0: 0.004, 3: 0.012}


def test_retries_of_a_draft_that_never_pays_grow_ever_rarer():
    """While not speculating, the most promising γ is retried after 8 decisions, then 16, 32, … (capped), so a draft
    that is never accepted costs ever less; a choice to speculate starts the count over."""
    policy = learned_policy(lambda width: 0.01 + 0.001 * width, 0.002, 0.0, batch=1)
    policy.DECIDE_EVERY = 1
    policy.RETRY_SPECULATION_WITHIN = 0.0
    choices = [policy.choose(["greedy"], [6]) for _ in range(8 + 16 + 32 + 64)]
    retries = [index + 1 for index, gamma in enumerate(choices) if gamma]
    assert retries == [8, 24, 56, 120]
    for _ in range(200):
        policy.observe_acceptance("greedy", [(6, 6)])
    assert policy.choose(["greedy"], [6]) > 0
    assert policy._bucket_costs(1).retry_gap == LoadAwareGamma.RETRY_SPECULATION_EVERY
