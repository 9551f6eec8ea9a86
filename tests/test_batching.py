"""Batched generation: every row's output equals what the same request gets alone, whatever shares its batch.

Rows differ in prompt length, γ, sampling parameters and where they stop (EOS, stop strings, max_new_tokens); rows
join as others leave (more prompts than slots), one is aborted, long prompts are prefilled in chunks between steps.
float64 models, so no near-tie can flip an argmax.
"""

from __future__ import annotations

import random

import pytest
import torch
from fakes import TableRunner

from speculor import SpeculativeDecoder, SpeculorError
from speculor.adaptive import FixedGamma
from speculor.api import run_batch
from speculor.engine import BatchEngine, DecodeRequest
from speculor.proposers import DraftModelProposer
from speculor.sampling import SamplingParams


def prompts(count: int, seed: int, vocab: int = 96) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(count)]


@pytest.fixture(scope="module")
def llama_decoders(llama_pair):
    target, draft = llama_pair
    alone = SpeculativeDecoder(target, dtype=torch.float64, max_batch_size=1)
    batched = SpeculativeDecoder(target, draft, dtype=torch.float64, max_batch_size=3, prefill_chunk=7)
    return alone, batched


def test_rows_of_a_rolling_batch_equal_each_request_alone(llama_decoders):
    alone, batched = llama_decoders
    cases = prompts(8, seed=1)
    gammas = [1, 2, 3, 4, 5, 6, 1, 3]
    lengths = [5, 17, 9, 20, 1, 12, 16, 3]
    engine = batched.new_engine()
    requests = [
        batched.request(prompt, max_new_tokens=length, gamma=gamma, ignore_eos=True)
        for prompt, gamma, length in zip(cases, gammas, lengths, strict=True)
    ]
    results = run_batch(engine, requests)
    for prompt, length, result in zip(cases, lengths, results, strict=True):
        expected = alone.generate(prompt, max_new_tokens=length, ignore_eos=True).token_ids
        assert result.token_ids == expected
        assert result.stats.new_tokens == length
    outputs = {tuple(result.token_ids[:4]) for result in results}
    assert len(outputs) > 4, "a degenerate model proves nothing"


def test_generate_on_a_list_returns_results_in_order(llama_decoders):
    alone, batched = llama_decoders
    cases = prompts(5, seed=2)
    results = batched.generate(cases, max_new_tokens=10, ignore_eos=True)
    assert [r.token_ids for r in results] == [
        alone.generate(p, max_new_tokens=10, ignore_eos=True).token_ids for p in cases
    ]
    single = batched.generate(cases[0], max_new_tokens=10, ignore_eos=True)
    assert single.token_ids == results[0].token_ids


def test_rows_stop_at_eos_at_different_steps(llama_pair):
    target, draft = llama_pair
    alone = SpeculativeDecoder(target, dtype=torch.float64, max_batch_size=1)
    cases = prompts(6, seed=3)
    references = [alone.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in cases]
    # Make a token the first rows emit mid-generation an end-of-sequence token.
    eos = references[0][6]
    batched = SpeculativeDecoder(target, draft, dtype=torch.float64, max_batch_size=4)
    batched.eos_ids = frozenset({eos})
    alone.eos_ids = frozenset({eos})
    results = batched.generate(cases, max_new_tokens=16, gamma=3)
    finishes = set()
    for prompt, result in zip(cases, results, strict=True):
        expected = alone.generate(prompt, max_new_tokens=16)
        assert result.token_ids == expected.token_ids
        assert result.finish_reason == expected.finish_reason
        finishes.add((result.finish_reason, len(result.token_ids)))
    assert ("eos", 7) in finishes and len(finishes) > 1


def test_stop_strings_and_sampled_rows_share_a_batch(text_pair_dirs):
    target, draft = text_pair_dirs
    alone = SpeculativeDecoder(target, device="cpu", max_batch_size=1)
    batched = SpeculativeDecoder(target, draft, device="cpu", max_batch_size=4)
    texts = ["def add(a, b):\n", "for item in items:\n", "class Point:\n", "import os\n"]
    options = [
        {"stop": ["\n"], "max_new_tokens": 12},
        {"temperature": 0.9, "seed": 5, "max_new_tokens": 12, "gamma": 2},
        {"stop": ["self", ")"], "max_new_tokens": 20},
        {"temperature": 0.6, "top_k": 5, "top_p": 0.9, "seed": 9, "max_new_tokens": 12, "gamma": 3},
    ]
    engine = batched.new_engine()
    results = run_batch(engine, [batched.request(t, **o) for t, o in zip(texts, options, strict=True)])
    for text, option, result in zip(texts, options, results, strict=True):
        # A sampled row: the same seed and γ give the same sample alone as in a batch.
        expected = (batched if "temperature" in option else alone).generate(text, **option)
        assert (result.text, result.token_ids, result.finish_reason) == (
            expected.text,
            expected.token_ids,
            expected.finish_reason,
        )


def test_abort_frees_the_slot_for_the_next_request(llama_decoders):
    alone, batched = llama_decoders
    engine = batched.new_engine()
    cases = prompts(4, seed=4)
    ids = [engine.add(batched.request(p, max_new_tokens=30, gamma=2, ignore_eos=True)) for p in cases[:3]]
    assert engine.free_slots == 0
    with pytest.raises(SpeculorError, match="slots are busy"):
        engine.add(batched.request(cases[3], max_new_tokens=5))
    for _ in range(3):
        engine.step()
    partial = engine.abort(ids[1])
    assert partial.finish_reason == "abort" and 0 < len(partial.token_ids) < 30
    late = engine.add(batched.request(cases[3], max_new_tokens=12, gamma=4, ignore_eos=True))
    results = {}
    while engine.running:
        for event in engine.step():
            if event.result is not None:
                results[event.request_id] = event.result
    for request_id, prompt, length in ((ids[0], cases[0], 30), (ids[2], cases[2], 30), (late, cases[3], 12)):
        assert results[request_id].token_ids == alone.generate(prompt, max_new_tokens=length, ignore_eos=True).token_ids
    expected_prefix = alone.generate(cases[1], max_new_tokens=30, ignore_eos=True).token_ids
    assert partial.token_ids == expected_prefix[: len(partial.token_ids)]


def test_logprobs_are_the_targets_own(llama_decoders, llama_pair):
    _, batched = llama_decoders
    prompt = prompts(1, seed=6)[0]
    pieces = list(batched.stream(prompt, max_new_tokens=8, gamma=3, ignore_eos=True, logprobs=2))
    tokens = [t for piece in pieces for t in piece.token_ids]
    logprobs = [entry for piece in pieces for entry in piece.logprobs]
    with torch.no_grad():
        logits = llama_pair[0](torch.tensor([prompt + tokens])).logits[0].double().log_softmax(-1)
    for index, entry in enumerate(logprobs):
        row = logits[len(prompt) - 1 + index]
        assert entry.token_id == tokens[index]
        assert entry.logprob == pytest.approx(float(row[tokens[index]]), abs=1e-6)
        assert [token for token, _ in entry.top] == row.topk(2).indices.tolist()


def test_load_aware_is_the_default_and_keeps_greedy_output(llama_decoders):
    alone, batched = llama_decoders
    cases = prompts(6, seed=7)
    results = batched.generate(cases, max_new_tokens=12, ignore_eos=True)
    for prompt, result in zip(cases, results, strict=True):
        assert result.token_ids == alone.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    assert sum(steps for r in results for steps in r.stats.gamma_steps.values()) == sum(
        r.stats.target_forwards for r in results
    )


def test_counters_add_up_when_eos_cuts_a_step_short():
    """A draft equal to the target accepts all γ = 4 drafts; the first token is the target's alone, and an EOS at
    the third token cuts the second step after two drafts. The counters count only what was kept: 2 drafted, 2
    accepted, 3 new tokens, one chosen by the target."""

    def run(eos_ids: frozenset[int]):
        engine = BatchEngine(TableRunner(5, seed=0), DraftModelProposer(TableRunner(5, seed=0), 5), 5, None)
        request = DecodeRequest([1, 2, 3], 6, SamplingParams(), FixedGamma(4), eos_ids)
        return run_batch(engine, [request])[0]

    free = run(frozenset())
    assert (free.stats.accepted, free.stats.new_tokens, free.stats.target_forwards) == (4, 6, 2)
    cut = run(frozenset({free.token_ids[2]}) - set(free.token_ids[:2]))
    assert cut.finish_reason == "eos" and len(cut.token_ids) == 3
    assert (cut.stats.drafted, cut.stats.accepted, cut.stats.new_tokens, cut.stats.target_forwards) == (2, 2, 3, 2)
