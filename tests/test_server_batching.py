"""Continuous batching in `speculor serve`: concurrent requests share engine steps and still get exactly what offline
generation gives; a client that leaves frees its slot at once; a full queue answers 503 with Retry-After; prompt
lists go in together; log-probabilities come in OpenAI's two shapes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from server_support import CONTEXT, GAMMA, MODEL, metric_samples, serving, wait_for

from speculor import SpeculativeDecoder
from speculor.server import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [f"def function_{index}(x):\n    return x * {index}" for index in range(12)]


@pytest.fixture(scope="module")
def reference(model_dirs) -> SpeculativeDecoder:
    return SpeculativeDecoder(model_dirs["target"], model_dirs["draft"], device="cpu", max_batch_size=1)


@contextmanager
def server(model_dirs, max_batch_size: int, step_delay: float = 0.0, **options) -> Iterator[str]:
    """A server of its own; `step_delay` slows every target step down, so that a long generation is still running
    when the test's next request arrives (the tiny model would otherwise finish it in a blink)."""
    decoder = SpeculativeDecoder(model_dirs["target"], model_dirs["draft"], device="cpu", max_batch_size=max_batch_size)
    if step_delay:
        fast_step = decoder.target_runner.step

        def slow_step(slots, token_ids):
            time.sleep(step_delay)
            return fast_step(slots, token_ids)

        decoder.target_runner.step = slow_step
    with serving(create_app(decoder, gamma=GAMMA, model_name=MODEL, **options)) as running:
        yield running.url


@pytest.fixture(scope="module")
def batch_url(model_dirs) -> Iterator[str]:
    with server(model_dirs, max_batch_size=4) as url:
        yield url


def offline(reference: SpeculativeDecoder, prompt, max_tokens: int) -> str:
    return reference.generate(prompt, max_new_tokens=max_tokens, gamma=GAMMA, temperature=0).text


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_concurrent_requests_share_steps_and_match_offline_greedy(batch_url, reference):
    lengths = [3 + index % 5 * 3 for index in range(len(PROMPTS))]
    expected = [offline(reference, prompt, length) for prompt, length in zip(PROMPTS, lengths, strict=True)]
    assert len(set(expected)) > len(expected) // 2, "a degenerate model proves nothing"
    before = metric_samples(batch_url)

    async def ask(client: AsyncOpenAI, index: int) -> str:
        options = {"model": MODEL, "prompt": PROMPTS[index], "max_tokens": lengths[index], "temperature": 0}
        if index % 2:
            stream = await client.completions.create(stream=True, **options)
            return "".join([chunk.choices[0].text async for chunk in stream])
        return (await client.completions.create(**options)).choices[0].text

    async def ask_all() -> list[str]:
        async with AsyncOpenAI(base_url=f"{batch_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(ask(client, index) for index in range(len(PROMPTS))))

    assert asyncio.run(ask_all()) == expected
    after = metric_samples(batch_url)
    steps = sample(after, "speculor_batch_size_count") - sample(before, "speculor_batch_size_count")
    rows = sample(after, "speculor_batch_size_sum") - sample(before, "speculor_batch_size_sum")
    assert rows / steps > 1.5, "the requests should have shared most steps"
    assert sample(after, "speculor_step_gamma_count") > sample(before, "speculor_step_gamma_count")
    assert sample(after, "speculor_requests_running") == sample(after, "speculor_requests_waiting") == 0


def test_a_prompt_list_goes_in_as_one_batch(batch_url, reference):
    prompts = PROMPTS[:4]
    before = metric_samples(batch_url)
    client = OpenAI(base_url=f"{batch_url}/v1", api_key="unused", max_retries=0, timeout=60)
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, extra_body={})
    assert [choice.text for choice in response.choices] == [offline(reference, prompt, 6) for prompt in prompts]
    after = metric_samples(batch_url)
    full_steps = sample(after, "speculor_batch_size_count") - sample(after, "speculor_batch_size_bucket", le="2.0")
    full_before = sample(before, "speculor_batch_size_count") - sample(before, "speculor_batch_size_bucket", le="2.0")
    assert full_steps > full_before, "the four prompts should have run in steps of more than two rows"


def test_completion_logprobs_match_the_offline_engine(batch_url, reference):
    prompt = PROMPTS[0]
    client = OpenAI(base_url=f"{batch_url}/v1", api_key="unused", max_retries=0, timeout=60)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    logprobs = whole.choices[0].logprobs
    offline_logprobs = [
        entry
        for delta in reference.stream(prompt, max_new_tokens=6, gamma=GAMMA, temperature=0, logprobs=2)
        for entry in delta.logprobs
    ]
    assert logprobs.tokens == [reference.tokenizer.decode([entry.token_id]) for entry in offline_logprobs]
    assert logprobs.token_logprobs == pytest.approx([entry.logprob for entry in offline_logprobs], abs=1e-5)
    for token, top, entry in zip(logprobs.tokens, logprobs.top_logprobs, offline_logprobs, strict=True):
        assert token in top and len(top) <= 3
        assert max(top.values()) == pytest.approx(entry.top[0][1], abs=1e-5)
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:index])) for index in range(6)]

    streamed_tokens, streamed_offsets = [], []
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, stream=True)
    for chunk in stream:
        if chunk.choices[0].logprobs is not None:
            streamed_tokens += chunk.choices[0].logprobs.tokens
            streamed_offsets += chunk.choices[0].logprobs.text_offset
    assert (streamed_tokens, streamed_offsets) == (logprobs.tokens, logprobs.text_offset)


def test_chat_logprobs_and_top_logprobs(batch_url):
    client = OpenAI(base_url=f"{batch_url}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Write a loop."}]
    options = {"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0}
    response = client.chat.completions.create(**options, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 5
    for entry in content:
        values = [alternative.logprob for alternative in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0], abs=1e-6)  # greedy: the chosen token is the likeliest
        if entry.token == "\ufffd":  # a byte of a character (this tokenizer's byte tokens): that byte
            assert len(entry.bytes) == 1 and entry.bytes[0] >= 0x80
        else:
            assert bytes(entry.bytes) == entry.token.encode()
    plain = client.chat.completions.create(**options, logprobs=True)
    assert [entry.top_logprobs for entry in plain.choices[0].logprobs.content] == [[]] * 5
    assert client.chat.completions.create(**options).choices[0].logprobs is None


def test_a_disconnect_frees_its_slot_for_the_next_request(model_dirs):
    long_body = {"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
    short_body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 0}
    with server(model_dirs, max_batch_size=1, step_delay=0.02) as url, ThreadPoolExecutor(1) as pool:
        with (
            httpx.Client(base_url=url, timeout=60) as leaving,
            leaving.stream("POST", "/v1/completions", json=long_body) as stream,
        ):
            lines = stream.iter_lines()  # held: a dropped line iterator would close the stream early
            next(line for line in lines if line.startswith("data: "))
            queued = pool.submit(httpx.post, f"{url}/v1/completions", json=short_body, timeout=60)
            wait_for(lambda: httpx.get(f"{url}/health").json()["waiting"] == 1)
        answer = queued.result(timeout=30)
        assert answer.json()["usage"]["completion_tokens"] == 3
        samples = metric_samples(url)
        assert sample(samples, "speculor_generations_total", finish_reason="cancelled") == 1
        assert sample(samples, "speculor_generated_tokens_total") < CONTEXT - 8
        assert sample(samples, "speculor_requests_running") == sample(samples, "speculor_requests_waiting") == 0


def test_a_full_queue_answers_503_with_retry_after_at_once(model_dirs):
    long_body = {"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
    with (
        server(model_dirs, max_batch_size=1, max_queue=1, step_delay=0.02) as url,
        httpx.Client(base_url=url, timeout=60) as session,
    ):
        with session.stream("POST", "/v1/completions", json=long_body) as running:
            lines = running.iter_lines()  # held: a dropped line iterator would close the stream early
            next(line for line in lines if line.startswith("data: "))
            with session.stream("POST", "/v1/completions", json=long_body):
                wait_for(lambda: session.get("/health").json()["waiting"] == 1)
                refused = session.post("/v1/completions", json={**long_body, "stream": False})
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "server_overloaded"
        wait_for(lambda: session.get("/health").json()["running"] == 0)
        served = session.post("/v1/completions", json={**long_body, "stream": False, "max_tokens": 2})
        assert served.json()["usage"]["completion_tokens"] == 2
