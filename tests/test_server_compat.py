"""OpenAI compatibility of `speculor serve` as real clients exercise it: the official `openai` client written the
ordinary way (the naive streaming loop, `models.retrieve`, None for optional arguments, a list of prompts as
LangChain's `OpenAI.batch` sends), and raw HTTP for what the SDK would not send (HEAD, CORS preflights, explicit
nulls next to harmless options)."""

from __future__ import annotations

import httpx
import pytest
import uvicorn
from openai import BadRequestError, NotFoundError, OpenAI
from server_support import GAMMA, MODEL, serving, sse_events
from starlette.testclient import TestClient

from speculor import SpeculativeDecoder
from speculor.cli import main
from speculor.server import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "def add(a, b):"


@pytest.fixture
def client(server_url) -> OpenAI:
    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


def offline(reference: SpeculativeDecoder, prompt, max_tokens: int) -> str:
    return reference.generate(prompt, max_new_tokens=max_tokens, gamma=GAMMA, temperature=0).text


def test_the_test_model_says_something_varied(reference):
    """Greedy equality proves nothing if the random model repeats one token; this one does not."""
    assert len(set(reference.generate(PROMPT, max_new_tokens=16, gamma=GAMMA).token_ids)) > 4


def test_the_naive_streaming_loop_works_and_ends_with_the_speculative_counters(client, reference):
    pieces = []
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    for chunk in stream:
        pieces.append(chunk.choices[0].text)
        last = chunk
    assert "".join(pieces) == offline(reference, PROMPT, 12)
    assert last.choices[0].finish_reason == "length"
    assert last.usage is None
    assert last.model_extra["speculative"]["drafted"] > 0

    messages = [{"role": "user", "content": "Write a loop."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chat)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert text == whole.choices[0].message.content


def test_include_usage_adds_one_usage_chunk_and_nulls_usage_elsewhere(server_url, client):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with_usage = sse_events(
        httpx.post(f"{server_url}/v1/completions", json={**body, "stream_options": {"include_usage": True}})
    )
    without = sse_events(httpx.post(f"{server_url}/v1/completions", json=body))
    assert with_usage[-1] == without[-1] == "[DONE]"
    *chunks, usage_chunk, _ = with_usage
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 8
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks)
    assert all("usage" not in chunk for chunk in without[:-1])
    assert chunks[-1]["speculative"] == usage_chunk["speculative"] == without[-2]["speculative"]
    assert len(without) == len(with_usage) - 1

    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    received = list(stream)
    assert received[-1].choices == [] and received[-1].usage.completion_tokens == 8
    assert all(chunk.usage is None for chunk in received[:-1])


def test_continuous_usage_stats_count_the_tokens_each_chunk_carries(server_url):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 9, "temperature": 0, "stream": True}
    options = {"include_usage": True, "continuous_usage_stats": True}
    *chunks, final, _ = sse_events(httpx.post(f"{server_url}/v1/completions", json={**body, "stream_options": options}))
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == final["usage"]["completion_tokens"] == 9
    assert all(chunk["usage"]["prompt_tokens"] == final["usage"]["prompt_tokens"] for chunk in chunks)


def test_models_retrieve(client, model_dirs):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(NotFoundError) as raised:
        client.models.retrieve("gpt-4")
    assert raised.value.body["code"] == "model_not_found"
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu")
    with serving(create_app(decoder)) as running:
        by_path = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        name = str(model_dirs["plain"])  # a model served under its path: the SDK escapes its slashes
        assert by_path.models.retrieve(name).id == name


def test_a_list_of_prompts_gets_one_choice_each_in_order(client, reference):
    ids = reference.encode("class Point:")
    prompts = ["for item in items:", PROMPT, "import os\n"]
    expected = [offline(reference, prompt, 6) for prompt in prompts]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert [choice.text for choice in response.choices] == expected
    prompt_tokens = sum(len(reference.encode(prompt)) for prompt in prompts)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 18)
    by_ids = client.completions.create(model=MODEL, prompt=[ids, reference.encode(PROMPT)], max_tokens=6, temperature=0)
    assert [choice.text for choice in by_ids.choices] == [offline(reference, ids, 6), expected[1]]

    streamed = ["", "", ""]
    finished = []
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True):
        choice = chunk.choices[0]
        streamed[choice.index] += choice.text
        if choice.finish_reason is not None:
            finished.append(choice.index)
            assert chunk.model_extra["speculative"]["drafted"] > 0
    assert streamed == expected
    assert sorted(finished) == [0, 1, 2]


def test_null_means_absent_and_harmless_options_are_accepted(server_url, client, reference):
    expected = offline(reference, PROMPT, 5)
    from_sdk = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, top_p=None, n=None, seed=None, stop=None, user=None
    )
    assert from_sdk.choices[0].text == expected
    nulls = dict.fromkeys(("top_p", "top_k", "n", "stream", "stream_options", "seed", "stop", "logprobs", "echo"))
    harmless = {
        "user": "someone",
        "metadata": {"team": "a"},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "best_of": 1,
        "echo": False,
        "n": 1,
        "logit_bias": {},
        "stream_options": {"include_usage": False},
    }
    for extra in (nulls, harmless):
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, **extra}
        response = httpx.post(f"{server_url}/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == expected
    chat_extras = {"logprobs": False, "response_format": {"type": "text"}, "tools": None, "temperature": None}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **chat_extras}
    assert httpx.post(f"{server_url}/v1/chat/completions", json=chat).status_code == 200


def test_invalid_values_raise_the_sdks_bad_request_error(client):
    with pytest.raises(BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=-1)
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == "temperature"
    with pytest.raises(BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, logprobs=21)
    assert raised.value.body["param"] == "logprobs"
    with pytest.raises(BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt=[5, -1], max_tokens=5)
    assert "token ids must be integers in [0," in raised.value.body["message"]
    assert "[-1]" in raised.value.body["message"]


def test_seeds_across_the_64_bit_range_and_top_k_minus_one(client, reference):
    options = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0}
    for seed in (2**64 - 1, -(2**63), 3):
        first, second = (client.completions.create(seed=seed, **options).choices[0].text for _ in range(2))
        assert first == second
    disabled = client.completions.create(seed=3, extra_body={"top_k": -1}, **options).choices[0].text
    expected = reference.generate(PROMPT, max_new_tokens=6, gamma=GAMMA, temperature=1.0, seed=3).text
    assert disabled == expected


def test_head_health_and_no_cors_unless_asked(server_url):
    head = httpx.head(f"{server_url}/health")
    assert (head.status_code, head.content) == (200, b"")
    preflight = httpx.options(
        f"{server_url}/v1/completions",
        headers={"Origin": "http://page.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_origin_opens_the_api_to_that_origin(model_dirs, monkeypatch):
    started = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets: started.update(app=server.config.app))
    monkeypatch.setattr(SpeculativeDecoder, "warm_up", lambda decoder, gamma: None)
    arguments = ["serve", "--target", str(model_dirs["plain"]), "--device", "cpu", "--port", "0"]
    assert main([*arguments, "--cors-origin", "http://page.example"]) == 0
    browser = TestClient(started["app"], base_url="http://localhost")
    request_headers = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    allowed = browser.options("/v1/completions", headers={"Origin": "http://page.example", **request_headers})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://page.example"
    models = browser.get("/v1/models", headers={"Origin": "http://page.example"})
    assert models.headers["access-control-allow-origin"] == "http://page.example"
    other = browser.options("/v1/completions", headers={"Origin": "http://elsewhere.example", **request_headers})
    assert "access-control-allow-origin" not in other.headers
