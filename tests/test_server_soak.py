"""A bounded soak test of `speculor serve` on loopback: 2,000 requests from 64 concurrent clients against the shipped
pair with its load-aware γ and 32 batch slots (so half the clients queue) — mixed prompts, lengths and sampling
parameters, streamed and whole, a fifth of the clients leaving mid-stream. None may be lost or hang, every greedy
answer must equal offline generation, and the queue and the batch must be empty at the end. Short prompts and at
most 8 new tokens keep it near a minute on two idle CPU cores; `SPECULOR_SOAK_REQUESTS` scales it (e.g. 20000 for a
longer run)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from server_support import metric_samples, serving, wait_for

from speculor import SpeculativeDecoder
from speculor.models import shipped
from speculor.server import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REQUESTS = int(os.environ.get("SPECULOR_SOAK_REQUESTS", "2000"))
CONCURRENCY = 64
DISCONNECT_SHARE = 0.2
GREEDY_SHARE = 0.5
MAX_TOKENS = (1, 3, 8)
PROMPTS = [
    "def add(a, b):\n",
    "import os\n",
    "class Stack:\n",
    "for index in range(10):\n",
    "def is_prime(n):\n",
    "    return ",
    "if __name__ == '__main__':\n",
    "def fibonacci(n):\n",
    "with open(path) as handle:\n",
    "try:\n    import numpy\n",
    "def read_lines(path):\n",
    "    def __init__(self):\n",
]
MODEL = "soak"


@dataclass(frozen=True)
class Plan:
    """One client request: what to ask and how to behave."""

    prompt: str
    max_tokens: int
    sampling: dict = field(default_factory=dict)
    stream: bool = False
    disconnect: bool = False

    @property
    def greedy(self) -> bool:
        return not self.sampling


def make_plans(count: int, seed: int) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for _ in range(count):
        disconnect = rng.random() < DISCONNECT_SHARE
        sampling = {}
        if rng.random() >= GREEDY_SHARE:
            sampling = {"temperature": rng.choice([0.5, 0.8, 1.0]), "seed": rng.randrange(1 << 32)}
            sampling |= rng.choice([{}, {"top_p": 0.9}, {"top_k": 20}, {"top_k": -1, "top_p": 0.95}])
        plans.append(
            Plan(
                prompt=rng.choice(PROMPTS),
                max_tokens=rng.choice(MAX_TOKENS) if not disconnect else 8,
                sampling=sampling,
                stream=disconnect or rng.random() < 0.5,
                disconnect=disconnect,
            )
        )
    return plans


async def run_plan(client: httpx.AsyncClient, plan: Plan) -> tuple[str, str | None]:
    """(finish reason or "left", text) of one request; "left" when the client went away mid-stream."""
    body = {"model": MODEL, "prompt": plan.prompt, "max_tokens": plan.max_tokens, "temperature": 0, **plan.sampling}
    if not plan.stream:
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return choice["finish_reason"], choice["text"]
    pieces, finish_reason = [], None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            pieces.append(choice["text"])
            finish_reason = choice["finish_reason"] or finish_reason
            if plan.disconnect and choice["text"]:
                return "left", None
    return finish_reason, "".join(pieces)


async def run_all(url: str, plans: list[Plan]) -> tuple[list[tuple[str, str | None]], int]:
    """Every plan's outcome, in plan order, and the longest queue seen on /health while they ran."""
    outcomes: list[tuple[str, str | None] | None] = [None] * len(plans)
    next_plan = 0
    peak_waiting = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_plan
        while next_plan < len(plans):
            index, next_plan = next_plan, next_plan + 1
            outcomes[index] = await run_plan(client, plans[index])

    async def watch_queue(clients: asyncio.Future) -> None:
        nonlocal peak_waiting
        async with httpx.AsyncClient(base_url=url, timeout=60) as monitor:
            while not clients.done():
                peak_waiting = max(peak_waiting, (await monitor.get("/health")).json()["waiting"])
                await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        clients = asyncio.gather(*(client_loop(client) for _ in range(CONCURRENCY)))
        await asyncio.gather(clients, watch_queue(clients))
    assert all(outcome is not None for outcome in outcomes)
    return outcomes, peak_waiting


def test_2000_requests_at_concurrency_64_none_lost_all_greedy_answers_exact():
    family = shipped()
    plans = make_plans(REQUESTS, seed=0)
    offline = SpeculativeDecoder(family.target, family.best_draft, device="cpu", max_batch_size=1)
    expected = {
        (plan.prompt, plan.max_tokens): offline.generate(plan.prompt, max_new_tokens=plan.max_tokens).text
        for plan in plans
        if plan.greedy and not plan.disconnect
    }
    assert len(set(expected.values())) > len(expected) // 2, "a degenerate model proves nothing"
    decoder = SpeculativeDecoder(family.target, family.best_draft, device="cpu", max_batch_size=CONCURRENCY // 2)
    with serving(create_app(decoder, model_name=MODEL)) as running:
        outcomes, peak_waiting = asyncio.run(asyncio.wait_for(run_all(running.url, plans), timeout=300))
        wait_for(lambda: httpx.get(f"{running.url}/health").json()["running"] == 0)
        health = httpx.get(f"{running.url}/health").json()
        samples = metric_samples(running.url)

    reasons = Counter(reason for reason, _ in outcomes)
    assert set(reasons) <= {"stop", "length", "left"}
    assert reasons["left"] == sum(plan.disconnect for plan in plans)
    for plan, (reason, text) in zip(plans, outcomes, strict=True):
        if plan.greedy and reason != "left":
            assert text == expected[(plan.prompt, plan.max_tokens)], plan
    assert peak_waiting > 0, "half the clients should have queued for a slot"
    assert health["waiting"] == health["running"] == 0
    generations = {
        dict(labels)["finish_reason"]: value
        for (name, labels), value in samples.items()
        if name == "speculor_generations_total"
    }
    assert sum(generations.values()) == REQUESTS
    assert generations.get("cancelled", 0) <= reasons["left"]
    assert (
        samples[("speculor_requests_waiting", frozenset())] == samples[("speculor_requests_running", frozenset())] == 0
    )
    assert samples[("speculor_batch_size_sum", frozenset())] / samples[("speculor_batch_size_count", frozenset())] > 4
