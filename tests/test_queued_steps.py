"""Speculative steps queued ahead: step n + 1 (its drafts, verify and acceptance) queued on the device from step n's
results before the host reads them, its caches cut on the device (`drop_on_device`) and the host's lengths settled a
step late. On the CPU the engine is told to look ahead (on a GPU it does by default); every row must get exactly the
tokens of the plain order, including rows that stop inside a step already queued (EOS, a stop string,
max_new_tokens), rows that join mid-run, and seeded sampled rows."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import speculor
from speculor import SpeculativeDecoder
from speculor.api import run_batch
from speculor.engine import BatchEngine
from speculor.models import shipped
from speculor.runners.fast import FastRunner


def prompts(count: int, seed: int, vocab: int = 96) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(2, 20))] for _ in range(count)]


@pytest.fixture(scope="module")
def decoder(float32_pair):
    """The float32 target on the fast runner (eager on the CPU) and its noisy copy as draft: drafts partly
    accepted."""
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, draft, dtype=torch.float32, max_batch_size=4)
    assert isinstance(decoder.target_runner, FastRunner)
    return decoder


def count_chained(monkeypatch) -> list[int]:
    """Record the γ of every step queued ahead."""
    chained: list[int] = []
    queue_ahead = BatchEngine._queue_ahead

    def spy(self, rows, step, plan):
        chained.append(max(plan))
        return queue_ahead(self, rows, step, plan)

    monkeypatch.setattr(BatchEngine, "_queue_ahead", spy)
    return chained


@pytest.fixture(params=["host lengths", "device lengths"])
def looking_ahead(request):
    """Engines told to queue steps ahead, whose runners read positions from the host's lengths (as an eager runner
    does) or, as a captured GPU step does, from lengths kept on the device, where cuts are queued and the host
    settles them a step later. The runners are put back as they were afterwards."""
    touched = []

    def engine_of(decoder: SpeculativeDecoder) -> BatchEngine:
        for runner in (decoder.target_runner, decoder.draft_runner):
            touched.append((runner, runner.positions_from_device))
            runner.positions_from_device = request.param == "device lengths"
        engine = decoder.new_engine()
        engine.look_ahead = True
        return engine

    yield engine_of
    for runner, before in reversed(touched):
        runner.positions_from_device = before


def mixed_requests(decoder: SpeculativeDecoder, seed: int) -> list:
    """Greedy and seeded sampled rows, fixed γ of 1 to 4 and the load-aware γ, ending at different steps."""
    requests = []
    for index, prompt in enumerate(prompts(8, seed=seed)):
        gamma = [2, None, 4, 1, 3, None, 2, 4][index]
        temperature = [0.0, 0.0, 0.8, 0.0, 1.0, 0.7, 0.0, 0.0][index]
        requests.append(
            decoder.request(
                prompt,
                max_new_tokens=6 + 5 * index,
                gamma=gamma,
                temperature=temperature,
                seed=100 + index,
                ignore_eos=True,
            )
        )
    return requests


def test_queued_speculative_steps_change_no_token(decoder, looking_ahead, monkeypatch):
    requests = mixed_requests(decoder, seed=21)
    plain = run_batch(decoder.new_engine(), requests)
    chained = count_chained(monkeypatch)
    queued = run_batch(looking_ahead(decoder), requests)
    assert [r.token_ids for r in queued] == [r.token_ids for r in plain]
    assert [r.finish_reason for r in queued] == [r.finish_reason for r in plain]
    assert sum(gamma > 0 for gamma in chained) >= 10, "speculative steps were queued ahead"
    assert sum(r.stats.accepted for r in queued) > 0, "some drafts were accepted"
    assert len({token for r in plain for token in r.token_ids}) > 5, "the target does not repeat one token"


def test_rows_ending_at_eos_inside_a_queued_step(decoder, looking_ahead, monkeypatch):
    """Each row's EOS is a token it emits mid-way, so it ends inside a step whose successor is already queued; the
    rows still running keep their tokens and the finished rows' slots are reused by rows joining later."""
    base = mixed_requests(decoder, seed=22)
    free = run_batch(decoder.new_engine(), base)
    requests = []
    for request, result in zip(base, free, strict=True):
        eos = result.token_ids[len(result.token_ids) // 2]
        requests.append(dataclasses.replace(request, eos_ids=frozenset({eos}), ignore_eos=False))
    plain = run_batch(decoder.new_engine(), requests)
    assert any(r.finish_reason == "eos" for r in plain)
    chained = count_chained(monkeypatch)
    queued = run_batch(looking_ahead(decoder), requests)
    assert [r.token_ids for r in queued] == [r.token_ids for r in plain]
    assert [r.finish_reason for r in queued] == [r.finish_reason for r in plain]
    assert any(gamma > 0 for gamma in chained)


def test_the_caches_hold_what_each_row_committed_after_queued_steps(decoder, looking_ahead):
    """After every step, each running row's target cache is exactly its committed context less the pending token
    and its draft cache holds no more than that, once the host has settled the device-side cuts."""
    engine = looking_ahead(decoder)
    ids = [engine.add(request) for request in mixed_requests(decoder, seed=23)[:4]]
    while engine.running:
        engine.step()
        for request_id in ids:
            row = engine._rows.get(request_id)
            if row is None or not row.ready or not row.generated:
                continue
            ahead = engine._ahead
            extra = 0
            if ahead is not None and request_id in ahead.request_ids:
                extra = ahead.fed.shape[1]
            assert engine.target.length(row.slot) == len(row.context) - 1 + extra
            assert engine.proposer.runner.length(row.slot) <= len(row.context) - 1 + extra


def test_stop_strings_inside_a_queued_step_on_the_shipped_pair(looking_ahead, monkeypatch):
    family = shipped()
    decoder = speculor.SpeculativeDecoder(family.target, family.best_draft, device="cpu", max_batch_size=4)
    texts = ["def add(a, b):\n", "class Stack:\n", "import os\n\n\ndef main():\n", "for i in range(10):\n"]
    free = run_batch(decoder.new_engine(), [decoder.request(t, max_new_tokens=40, gamma=3) for t in texts])
    requests = []
    for text, result in zip(texts, free, strict=True):
        stop = result.text[len(result.text) // 2 : len(result.text) // 2 + 2]
        requests.append(decoder.request(text, max_new_tokens=40, gamma=3, stop=stop))
    plain = run_batch(decoder.new_engine(), requests)
    assert all(r.finish_reason == "stop" for r in plain)
    chained = count_chained(monkeypatch)
    queued = run_batch(looking_ahead(decoder), requests)
    assert [(r.text, r.token_ids, r.finish_reason) for r in queued] == [
        (r.text, r.token_ids, r.finish_reason) for r in plain
    ]
    assert sum(gamma > 0 for gamma in chained) >= 4
