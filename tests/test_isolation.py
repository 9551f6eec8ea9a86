"""One request never hurts another, and a seed gives the same tokens whatever γ, draft or batch.

A failure injected into one row of a running batch (its target step, its prefill, its text) finishes that row with
reason "error"; every other row's tokens equal what it gets alone. Seeded sampled rows are verified by
drafter-invariant coupling: their tokens are exactly the target alone's samples for the seed.
"""

from __future__ import annotations

import random

import pytest
import torch

from speculor import SpeculativeDecoder, SpeculorError
from speculor.adaptive import LoadAwareGamma
from speculor.api import run_batch
from speculor.engine import BatchEngine
from speculor.proposers import PromptLookupProposer


def prompts(count: int, seed: int, vocab: int = 96) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(2, 20))] for _ in range(count)]


class FailingRunner:
    """Wraps a runner; raises when `slot` is in a step (or a prefill, with `on_extend`) after `after` calls."""

    def __init__(self, runner, slot: int, after: int, on_extend: bool = False) -> None:
        self._runner = runner
        self.slot = slot
        self.after = after
        self.on_extend = on_extend
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def step(self, slots, token_ids):
        self.calls += 1
        if not self.on_extend and self.slot in slots and self.calls > self.after:
            raise RuntimeError("injected failure")
        return self._runner.step(slots, token_ids)

    def extend_rows(self, slots, token_ids):
        if self.on_extend and self.slot in slots:
            raise RuntimeError("injected prefill failure")
        return self._runner.extend_rows(slots, token_ids)


@pytest.fixture(scope="module")
def decoder(float32_pair):
    target, draft = float32_pair
    return SpeculativeDecoder(target, draft, dtype=torch.float32, max_batch_size=16)


@pytest.mark.parametrize("on_extend", [False, True])
def test_a_failing_row_finishes_alone_and_the_others_equal_their_solo_outputs(decoder, on_extend):
    cases = prompts(4, seed=3)
    requests = [decoder.request(p, max_new_tokens=12, gamma=3, ignore_eos=True) for p in cases]
    solo = [run_batch(decoder.new_engine(), [request])[0].token_ids for request in requests]
    engine = decoder.new_engine()
    engine.target = FailingRunner(engine.target, slot=1, after=2, on_extend=on_extend)
    results = run_batch(engine, requests)
    assert results[1].finish_reason == "error"
    assert "injected" in results[1].error
    if not on_extend:
        assert 0 < len(results[1].token_ids) < 12
        assert results[1].token_ids == solo[1][: len(results[1].token_ids)], "what a failed row emitted stands"
    for index in (0, 2, 3):
        assert results[index].finish_reason == "length"
        assert results[index].token_ids == solo[index]
    assert len({tuple(tokens) for tokens in solo}) == 4, "a degenerate model proves nothing"
    assert engine.free_slots == engine.capacity


def test_a_failure_in_one_rows_text_handling_spares_the_others(decoder, monkeypatch):
    cases = prompts(3, seed=4)
    requests = [decoder.request(p, max_new_tokens=8, gamma=2, ignore_eos=True) for p in cases]
    engine = decoder.new_engine()
    ids = [engine.add(request) for request in requests]
    original = BatchEngine._emit

    def emit(self, row, *args):
        if row.request_id == ids[0] and row.generated:
            raise ValueError("broken text")
        return original(self, row, *args)

    monkeypatch.setattr(BatchEngine, "_emit", emit)
    results = {}
    while engine.running:
        for event in engine.step():
            if event.result is not None:
                results[event.request_id] = event.result
    assert results[ids[0]].finish_reason == "error"
    assert [results[i].finish_reason for i in ids[1:]] == ["length", "length"]


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_any_batch_and_gamma(decoder):
    options = dict(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.95, seed=8, ignore_eos=True)
    prompt = prompts(1, seed=9)[0]
    alone = decoder.generate(prompt, speculative=False, **options).token_ids
    for gamma in (1, 2, 5):
        assert decoder.generate(prompt, gamma=gamma, **options).token_ids == alone
    others = prompts(15, seed=10)
    requests = [decoder.request(prompt, gamma=3, **options)]
    for index, other in enumerate(others):
        requests.append(
            decoder.request(
                other,
                max_new_tokens=5 + index,
                gamma=1 + index % 6,
                temperature=[0.0, 0.8, 1.3][index % 3],
                seed=None if index % 2 else index,
                ignore_eos=True,
            )
        )
    results = run_batch(decoder.new_engine(), requests)
    assert results[0].token_ids == alone
    assert results[0].stats.accepted > 0, "the noisy draft must get some tokens accepted"
    assert len(set(alone)) > 5, "a degenerate model proves nothing"


def test_without_coupling_a_seed_depends_on_gamma(decoder):
    """The negative control: under the rejection rule the drafts change what a rejection resamples."""
    options = dict(max_new_tokens=24, temperature=1.0, seed=8, ignore_eos=True, reproducible=False)
    prompt = prompts(1, seed=9)[0]
    outputs = {tuple(decoder.generate(prompt, gamma=gamma, **options).token_ids) for gamma in (1, 2, 3, 5)}
    assert len(outputs) > 1


def test_the_result_carries_the_logprobs_of_every_token(decoder):
    result = decoder.generate(prompts(1, seed=11)[0], max_new_tokens=9, gamma=3, logprobs=2, ignore_eos=True)
    assert result.logprobs is not None
    assert [entry.token_id for entry in result.logprobs] == result.token_ids
    assert all(len(entry.top) == 2 for entry in result.logprobs)


def test_empty_lookups_count_as_steps_without_drafting(float32_pair):
    target, _ = float32_pair
    decoder = SpeculativeDecoder(target, ngram=2, dtype=torch.float32)
    engine = decoder.new_engine()
    engine.proposer = PromptLookupProposer(2, engine.device)
    prompt = list(range(1, 9))  # no repeated token: the lookup finds nothing at first
    result = run_batch(engine, [decoder.request(prompt, max_new_tokens=6, gamma=3, ignore_eos=True)])[0]
    assert result.stats.gamma_steps.get(0, 0) > 0
    assert sum(result.stats.gamma_steps.values()) == result.stats.target_forwards
    assert sum(g * n for g, n in result.stats.gamma_steps.items()) == result.stats.drafted


@pytest.mark.parametrize("with_draft", [False, True])
def test_looking_ahead_changes_no_token(float32_pair, with_draft, monkeypatch):
    """The look-ahead (the next target-only step queued before this one's results are read) gives every row the
    tokens it gets without it, while rows finish at different steps, join mid-run and sample with seeds. With a
    draft, the load-aware policy is held at γ = 0 so that it looks ahead too."""
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, draft if with_draft else None, dtype=torch.float32, max_batch_size=4)
    cases = prompts(6, seed=12)
    requests = [
        decoder.request(prompt, max_new_tokens=5 + 3 * index, temperature=[0.0, 0.9][index % 2], seed=index)
        for index, prompt in enumerate(cases)
    ]
    plain = run_batch(decoder.new_engine(), requests)
    used = []
    take = BatchEngine._take_ahead

    def spy(self, rows):
        logits = take(self, rows)
        used.append(logits is not None)
        return logits

    monkeypatch.setattr(BatchEngine, "_take_ahead", spy)
    engine = decoder.new_engine()
    engine.look_ahead = True
    engine.load_aware = LoadAwareGamma(max_gamma=0)
    ahead = run_batch(engine, requests)
    assert [r.token_ids for r in ahead] == [r.token_ids for r in plain]
    assert sum(used) > len(used) / 2, "most steps used the look-ahead"
    assert not all(used), "rows joining undid a look-ahead"


def test_a_single_generation_that_fails_raises_with_what_failed(decoder):
    original = decoder.target_runner
    decoder.target_runner = FailingRunner(original, slot=0, after=3)
    try:
        with pytest.raises(SpeculorError, match="injected failure"):
            decoder.generate(prompts(1, seed=13)[0], max_new_tokens=10, gamma=2, ignore_eos=True)
    finally:
        decoder.target_runner = original
