"""A prompt several rows share (n samples of one prompt, or the same prompt sent again while a row holding it runs) is
prefilled once on the fast runner and copied to the other rows' caches; every row's tokens are exactly those it gets
with a prefill of its own."""

from __future__ import annotations

import random

import pytest
import torch

from speculor import SpeculativeDecoder
from speculor.api import run_batch
from speculor.runners.fast import FastRunner


@pytest.fixture(scope="module")
def decoder(float32_pair):
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, draft, dtype=torch.float32, max_batch_size=6)
    assert isinstance(decoder.target_runner, FastRunner)
    return decoder


def scramble_caches(decoder: SpeculativeDecoder) -> None:
    """Fill every cache position with noise, so that a position a copy missed cannot hold the right keys by chance
    (left over from an earlier run of the same prompt in that slot)."""
    with torch.inference_mode():
        decoder.target_runner.cache.kv.normal_(generator=torch.Generator().manual_seed(9))


def counting_prefill(monkeypatch, runner) -> list[int]:
    """Record how many prompt tokens each of this runner's prefills feeds (the draft's runner is not counted)."""
    fed: list[int] = []
    extend_rows = runner.extend_rows

    def spy(slots, token_ids):
        fed.append(sum(ids.numel() for ids in token_ids))
        return extend_rows(slots, token_ids)

    monkeypatch.setattr(runner, "extend_rows", spy)
    return fed


def test_samples_of_one_prompt_are_prefilled_once_and_keep_their_tokens(decoder, monkeypatch):
    rng = random.Random(4)
    prompt = [rng.randrange(96) for _ in range(40)]
    other = [rng.randrange(96) for _ in range(12)]
    requests = [
        decoder.request(prompt, max_new_tokens=12, temperature=0.9, seed=seed, gamma=gamma, ignore_eos=True)
        for seed, gamma in ((1, 2), (2, None), (3, 4))
    ]
    requests += [
        decoder.request(prompt, max_new_tokens=12, gamma=3, ignore_eos=True),
        decoder.request(other, max_new_tokens=12, gamma=2, ignore_eos=True),
    ]
    alone = [run_batch(decoder.new_engine(), [request])[0] for request in requests]
    fed = counting_prefill(monkeypatch, decoder.target_runner)
    scramble_caches(decoder)
    together = run_batch(decoder.new_engine(), requests)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert sum(fed) == (len(prompt) - 1) + (len(other) - 1), "the shared prompt was prefilled once"
    assert len({tuple(r.token_ids) for r in together[:3]}) == 3, "the samples differ"


def test_a_prompt_sent_again_while_its_first_row_runs_is_copied(decoder, monkeypatch):
    prompt = list(range(5, 35))
    request = decoder.request(prompt, max_new_tokens=10, gamma=2, ignore_eos=True)
    expected = run_batch(decoder.new_engine(), [request])[0].token_ids
    fed = counting_prefill(monkeypatch, decoder.target_runner)
    scramble_caches(decoder)
    engine = decoder.new_engine()
    first = engine.add(request)
    for _ in range(3):
        engine.step()
    second = engine.add(request)
    results = {}
    while engine.running:
        for event in engine.step():
            if event.result is not None:
                results[event.request_id] = event.result.token_ids
    assert results[first] == results[second] == expected
    assert sum(fed) == len(prompt) - 1
