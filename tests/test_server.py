"""`speculor serve` end to end: a real uvicorn server on a free local port, driven by the official `openai` client
and by raw HTTP for the malformed requests a client library would refuse to send.

Two model sets: the shipped family (target and best draft, as `speculor serve` serves it by default, with the chat
template it ships), and tiny random Llamas sharing a tiny trained BPE tokenizer that does have a
chat template — gibberish but cheap, so they carry the many-request tests. Greedy answers are compared with
offline generation on a separately loaded decoder.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from openai import AsyncOpenAI, BadRequestError, OpenAI
from server_support import (
    CONTEXT,
    GAMMA,
    MODEL,
    metric_samples,
    serving,
    sse_events,
    wait_for,
)

import speculor.server.command
from speculor import SpeculativeDecoder, SpeculorError
from speculor.cli import main
from speculor.models import shipped
from speculor.server import create_app
from speculor.server.command import SHIPPED_MODEL_NAME
from speculor.server.errors import APIError
from speculor.server.metrics import ServerMetrics
from speculor.server.worker import Generations, GenerationWorker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["def add(a, b):", "for item in items:", "class Point:", "import os\n", "The quick brown fox"]


@pytest.fixture(scope="module")
def plain_server(model_dirs) -> Iterator[tuple[str, SpeculativeDecoder]]:
    """The target alone behind n-gram prompt lookup, with no chat template; served under its path."""
    decoder = SpeculativeDecoder(model_dirs["plain"], ngram=2, device="cpu")
    with serving(create_app(decoder, gamma=GAMMA)) as running:
        yield running.url, decoder


@pytest.fixture
def client(server_url) -> OpenAI:
    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(server_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=60) as session:
        yield session


def offline(reference: SpeculativeDecoder, prompt, max_tokens: int, **options) -> str:
    return reference.generate(prompt, max_new_tokens=max_tokens, gamma=GAMMA, temperature=0, **options).text


def chat_prompt_ids(reference: SpeculativeDecoder, messages: list[dict]) -> list[int]:
    return reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


@pytest.fixture(scope="module")
def shipped_server() -> Iterator[tuple[OpenAI, SpeculativeDecoder]]:
    """The shipped pair as `speculor serve` serves it with no arguments but a fixed γ (the load-aware default may
    rightly choose γ = 0 on a busy CPU), and an offline copy to compare."""
    family = shipped()
    decoder = SpeculativeDecoder(family.target, family.best_draft, device="cpu")
    with serving(create_app(decoder, gamma=4, model_name=SHIPPED_MODEL_NAME)) as running:
        client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, SpeculativeDecoder(family.target, family.best_draft, device="cpu")


def test_the_shipped_pair_serves_offline_greedy_completions(shipped_server):
    client, offline_decoder = shipped_server
    prompt = "def is_prime(n):\n"
    expected = offline_decoder.generate(prompt, max_new_tokens=10, temperature=0).text
    whole = client.completions.create(model=SHIPPED_MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.model_extra["speculative"]["accepted"] > 0
    stream = client.completions.create(
        model=SHIPPED_MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == expected


def test_the_shipped_pair_answers_chat_with_its_own_template(shipped_server):
    """The shipped family's template (speculor/models/target/chat_template.jinja) writes the conversation as Python
    docstrings, so the default server answers chat clients, with the offline greedy answer."""
    client, offline_decoder = shipped_server
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Add two numbers."}]
    answer = client.chat.completions.create(model=SHIPPED_MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    prompt_ids = chat_prompt_ids(offline_decoder, messages)
    assert offline_decoder.tokenizer.decode(prompt_ids) == '"""Answer in Python."""\n"""Add two numbers."""\n'
    assert answer.choices[0].message.content == offline_decoder.generate(prompt_ids, max_new_tokens=10).text


def test_completions_match_offline_greedy_generation(client, reference):
    for prompt in PROMPTS:
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        choice = response.choices[0]
        assert choice.text == offline(reference, prompt, 12)
        assert choice.finish_reason == "length"
        prompt_tokens = len(reference.encode(prompt))
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 12)
        assert response.usage.total_tokens == prompt_tokens + 12
        speculative = response.model_extra["speculative"]
        assert speculative["drafted"] > 0
        assert 0 <= speculative["accepted"] <= speculative["drafted"]
        assert speculative["acceptance_rate"] == pytest.approx(speculative["accepted"] / speculative["drafted"])
        assert speculative["mean_accepted_length"] >= 1


def test_streamed_completion_equals_whole_answer(client):
    for prompt in PROMPTS:
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True))
        assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
        assert [chunk.choices[0].finish_reason for chunk in chunks] == [None] * (len(chunks) - 1) + ["length"]
        assert chunks[-1].model_extra["speculative"] == whole.model_extra["speculative"]
        assert all(chunk.usage is None and "usage" not in chunk.model_extra for chunk in chunks)


def test_token_id_prompts_and_one_element_batches(client, reference):
    ids = reference.encode("def add(a, b):")
    expected = offline(reference, ids, 8)
    for prompt in (ids, [ids], ["def add(a, b):"]):
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        assert response.choices[0].text == expected


def test_chat_matches_offline_generation_on_the_chat_template(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]
    expected = offline(reference, chat_prompt_ids(reference, messages), 10)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == len(chat_prompt_ids(reference, messages))
    assert whole.model_extra["speculative"]["drafted"] > 0
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected
    assert chunks[-1].usage == whole.usage


def test_content_parts_and_max_completion_tokens(client, reference):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Write "}, {"type": "text", "text": "a loop."}]}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0)
    plain = [{"role": "user", "content": "Write a loop."}]
    assert response.choices[0].message.content == offline(reference, chat_prompt_ids(reference, plain), 6)
    assert response.usage.completion_tokens == 6


def test_stop_strings_end_the_answer_before_them(client, reference):
    full = offline(reference, "def add(a, b):", 20)
    stop = full[6:9]
    response = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=20, temperature=0, stop=stop)
    assert response.choices[0].text == full[: full.find(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_end_of_sequence_is_a_stop_unless_ignored(model_dirs):
    decoder = SpeculativeDecoder(model_dirs["target"], model_dirs["draft"], device="cpu")
    third_token = decoder.generate("def add(a, b):", max_new_tokens=3, gamma=GAMMA).token_ids[2]
    decoder.eos_ids = frozenset({third_token})
    with serving(create_app(decoder, gamma=GAMMA, model_name=MODEL)) as running:
        client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        options = {"model": MODEL, "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
        stopped = client.completions.create(**options)
        ignored = client.completions.create(**options, extra_body={"ignore_eos": True})
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 3)
    assert (ignored.choices[0].finish_reason, ignored.usage.completion_tokens) == ("length", 8)


def test_seeded_sampling_is_reproducible_and_matches_offline(client, reference):
    options = {"temperature": 0.9, "top_p": 0.9, "seed": 7}
    answers = {
        client.completions.create(
            model=MODEL, prompt="class Point:", max_tokens=10, extra_body={"top_k": 50}, **options
        )
        .choices[0]
        .text
        for _ in range(2)
    }
    expected = reference.generate("class Point:", max_new_tokens=10, gamma=GAMMA, top_k=50, **options).text
    assert answers == {expected}


def test_models_and_health(client, http):
    assert [model.id for model in client.models.list().data] == [MODEL]
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == CONTEXT
    health = http.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["gamma"] == GAMMA


LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 40

TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
BAD_REQUESTS = [
    # (endpoint, raw body or JSON object, status, code, param)
    ("completions", b'{"model": "tiny-pair", "prompt": ', 400, "invalid_json", None),
    ("completions", b"", 400, "missing_required_parameter", "model"),
    ("chat/completions", b"  ", 400, "missing_required_parameter", "model"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model_not_found", "model"),
    ("completions", {"model": MODEL}, 400, "missing_required_parameter", "prompt"),
    ("completions", {"prompt": "hi"}, 400, "missing_required_parameter", "model"),
    ("completions", {"model": None, "prompt": "hi"}, 400, "missing_required_parameter", "model"),
    ("chat/completions", {"model": MODEL}, 400, "missing_required_parameter", "messages"),
    ("completions", [MODEL, "hi"], 400, "invalid_body", None),
    ("completions", {"model": MODEL, "prompt": 5}, 400, "invalid_value", "prompt"),
    ("completions", {"model": MODEL, "prompt": []}, 400, "invalid_prompt", "prompt"),
    ("completions", {"model": MODEL, "prompt": ["a", 5]}, 400, "invalid_value", "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, True]}, 400, "invalid_value", "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "invalid_value", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2.5}, 400, "invalid_value", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": "0.5"}, 400, "invalid_value", "temperature"),
    ("completions", b'{"model": "tiny-pair", "prompt": "hi", "temperature": NaN}', 400, "invalid_json", None),
    ("completions", b'{"model": "tiny-pair", "prompt": "hi", "user": Infinity}', 400, "invalid_json", None),
    (
        "completions",
        b'{"model": "tiny-pair", "prompt": "hi", "temperature": 1e999}',
        400,
        "invalid_value",
        "temperature",
    ),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": 101}, 400, "invalid_value", "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_k": 2**63}, 400, "invalid_value", "top_k"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_k": 10**30}, 400, "invalid_value", "top_k"),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": 10**30},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    ("completions", {"model": MODEL, "prompt": [5, 10**30]}, 400, "invalid_prompt", "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": ["x"] * 17}, 400, "invalid_value", "stop"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": "x" * 257}, 400, "invalid_value", "stop"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": ["x" * 9000] * 100}, 400, "invalid_value", "stop"),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"include_usage": True, "extra": 1}},
        400,
        "invalid_value",
        "stream_options.extra",
    ),
    ("completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "invalid_value", "stream"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop": 3}, 400, "invalid_value", "stop"),
    ("chat/completions", {"model": MODEL, "messages": "hi"}, 400, "invalid_value", "messages"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "invalid_value",
        "messages[0].role",
    ),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": -0.1}, 400, "invalid_value", "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "invalid_value", "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_k": -2}, 400, "invalid_value", "top_k"),
    ("completions", {"model": MODEL, "prompt": "hi", "seed": 2**64}, 400, "invalid_value", "seed"),
    ("completions", {"model": MODEL, "prompt": "hi", "seed": -(2**63) - 1}, 400, "invalid_value", "seed"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "invalid_value", "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": 65}, 400, "invalid_value", "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "invalid_value", "logprobs"),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": False}, 400, "invalid_value", "logprobs"),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        400,
        "invalid_value",
        "top_logprobs",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
        400,
        "invalid_value",
        "top_logprobs",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 1},
        400,
        "unsupported_parameter",
        "echo",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "echo": True},
        400,
        "unsupported_parameter",
        "echo",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5},
        400,
        "invalid_value",
        "presence_penalty",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "presence_penalty": False},
        400,
        "invalid_value",
        "presence_penalty",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "repetition_penalty": 0},
        400,
        "invalid_value",
        "repetition_penalty",
    ),
    ("completions", {"model": MODEL, "prompt": "hi", "min_p": 1.5}, 400, "invalid_value", "min_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "min_tokens": -1}, 400, "invalid_value", "min_tokens"),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "min_tokens": 9, "max_tokens": 4},
        400,
        "invalid_value",
        "min_tokens",
    ),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "invalid_value", "logit_bias.5"),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, 400, "invalid_value", "logit_bias"),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"99999": 1}}, 400, "invalid_value", "logit_bias"),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "stop_token_ids": [99999]},
        400,
        "invalid_value",
        "stop_token_ids",
    ),
    ("completions", {"model": MODEL, "prompt": "hi", "bad_words": [""]}, 400, "invalid_value", "bad_words[0]"),
    (
        "chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
        },
        400,
        "invalid_value",
        "response_format",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]},
        400,
        "unsupported_parameter",
        "tool_choice",
    ),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], "tool_choice": "auto"},
        400,
        "unsupported_parameter",
        "tool_choice",
    ),
    (
        "chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "missing"}},
        },
        400,
        "invalid_value",
        "tool_choice",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "guided_regex": "[a-"},
        400,
        "invalid_value",
        "guided_regex",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "allowed_token_ids": [3]},
        400,
        "unknown_parameter",
        "allowed_token_ids",
    ),
    (
        "completions",
        {"model": MODEL, "prompt": "hi", "max_completion_tokens": 3},
        400,
        "unknown_parameter",
        "max_completion_tokens",
    ),
    ("completions", {"model": MODEL, "prompt": "", "max_tokens": 2}, 400, "invalid_prompt", "prompt"),
    ("completions", {"model": MODEL, "prompt": [10**6]}, 400, "invalid_prompt", "prompt"),
    ("completions", {"model": MODEL, "prompt": [5, -1]}, 400, "invalid_prompt", "prompt"),
    ("completions", {"model": MODEL, "prompt": ["fine", [-1]]}, 400, "invalid_prompt", "prompt[1]"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1000}, 400, "context_length_exceeded", "max_tokens"),
    ("completions", {"model": MODEL, "prompt": LONG_TEXT}, 400, "context_length_exceeded", "prompt"),
    ("completions", {"model": MODEL, "prompt": ["hi", LONG_TEXT]}, 400, "context_length_exceeded", "prompt[1]"),
    (
        "chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": LONG_TEXT}]},
        400,
        "context_length_exceeded",
        "messages",
    ),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "code", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(http, endpoint, body, status, code, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(f"/v1/{endpoint}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"]
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]
    good = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert good.status_code == 200
    assert good.json()["usage"]["completion_tokens"] == 2


def test_oversized_bodies_and_unknown_paths(http):
    huge = {"model": MODEL, "prompt": "x" * (2 << 20)}
    response = http.post("/v1/completions", json=huge)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    chunked = http.post("/v1/completions", content=iter([b" " * (1 << 19)] * 4))
    assert chunked.status_code == 413
    missing = http.get("/v2/everything")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


def test_chat_without_a_template_is_a_clear_400(plain_server):
    url, decoder = plain_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    name = client.models.list().data[0].id
    with pytest.raises(BadRequestError) as raised:
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert "no chat template" in raised.value.body["message"]
    assert raised.value.body["code"] == "no_chat_template"
    response = client.completions.create(model=name, prompt="def add(a, b):", max_tokens=10, temperature=0)
    alone = decoder.generate("def add(a, b):", max_new_tokens=10, temperature=0, speculative=False).text
    assert response.choices[0].text == alone


def test_a_chat_template_given_to_the_server_serves_chat_for_a_model_without_one(model_dirs):
    """`create_app(chat_template=...)` (`speculor serve --chat-template FILE`) for a tokenizer without a template."""
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu")
    template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    messages = [{"role": "user", "content": "def add(a, b):"}]
    with serving(create_app(decoder, model_name=MODEL, chat_template=template)) as running:
        client = OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    prompt = decoder.tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, return_dict=False
    )
    assert decoder.tokenizer.decode(prompt) == "[user] def add(a, b):\n>"
    assert answer.choices[0].message.content == decoder.generate(list(prompt), max_new_tokens=6).text


def test_a_chat_template_that_cannot_render_is_refused_before_serving(model_dirs):
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu")
    with pytest.raises(SpeculorError, match="does not render a conversation"):
        create_app(decoder, chat_template="{% for m in messages %}{{ m.content }")


def test_32_concurrent_clients_all_get_their_own_complete_answer(server_url, reference):
    prompts = [f"def function_{index}(x):\n    return x * {index}" for index in range(32)]
    expected = [offline(reference, prompt, 8) for prompt in prompts]

    async def ask(client: AsyncOpenAI, index: int) -> str:
        options = {"model": MODEL, "prompt": prompts[index], "max_tokens": 8, "temperature": 0}
        if index % 2:
            stream = await client.completions.create(stream=True, **options)
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
        return (await client.completions.create(**options)).choices[0].text

    async def ask_all() -> list[str]:
        async with AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(ask(client, index) for index in range(32)))

    assert asyncio.run(ask_all()) == expected


def test_metrics_parse_and_counters_move_by_the_right_amounts(server_url, client):
    before = metric_samples(server_url)
    response = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=9, temperature=0)
    after = metric_samples(server_url)

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    speculative = response.model_extra["speculative"]
    assert moved("speculor_requests_total", endpoint="/v1/completions", status="200") == 1
    assert moved("speculor_generations_total", finish_reason="length") == 1
    assert moved("speculor_generated_tokens_total") == response.usage.completion_tokens == 9
    assert moved("speculor_prompt_tokens_total") == response.usage.prompt_tokens
    assert moved("speculor_drafted_tokens_total") == speculative["drafted"]
    assert moved("speculor_accepted_tokens_total") == speculative["accepted"]
    positions = [str(position) for position in range(GAMMA)]
    assert sum(moved("speculor_drafted_by_position_total", position=p) for p in positions) == speculative["drafted"]
    assert sum(moved("speculor_accepted_by_position_total", position=p) for p in positions) == speculative["accepted"]
    assert moved("speculor_time_to_first_token_seconds_count") == 1
    assert moved("speculor_request_latency_seconds_count") == 1
    assert after[("speculor_requests_running", frozenset())] == 0


def test_a_client_leaving_mid_stream_stops_its_generation(server_url, http):
    def cancelled() -> float:
        return metric_samples(server_url).get(
            ("speculor_generations_total", frozenset({("finish_reason", "cancelled")})), 0
        )

    before = cancelled()
    generated_before = metric_samples(server_url)[("speculor_generated_tokens_total", frozenset())]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT - 8, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=server_url, timeout=60) as leaving,
        leaving.stream("POST", "/v1/completions", json=body) as stream,
    ):
        next(line for line in stream.iter_lines() if line.startswith("data: "))
    wait_for(lambda: cancelled() == before + 1)
    generated = metric_samples(server_url)[("speculor_generated_tokens_total", frozenset())] - generated_before
    assert 0 < generated < CONTEXT - 8
    good = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert good.json()["usage"]["completion_tokens"] == 3


def test_a_client_timing_out_on_a_whole_answer_stops_its_generation(server_url, http):
    def cancelled() -> float:
        return metric_samples(server_url).get(
            ("speculor_generations_total", frozenset({("finish_reason", "cancelled")})), 0
        )

    before = cancelled()
    body = {"model": MODEL, "prompt": "hi", "max_tokens": CONTEXT - 8, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.05))
    wait_for(lambda: cancelled() == before + 1)
    assert http.get("/health").json()["waiting"] == 0


def test_a_failing_generation_answers_500_and_the_server_keeps_serving(plain_server, monkeypatch):
    url, decoder = plain_server

    def broken_step(slots, token_ids):
        raise RuntimeError("device lost")

    name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": name, "prompt": "hi", "max_tokens": 4, "temperature": 0}
    with monkeypatch.context() as patch:
        patch.setattr(decoder.target_runner, "step", broken_step)
        failed = httpx.post(f"{url}/v1/completions", json=body)
        streamed = sse_events(httpx.post(f"{url}/v1/completions", json={**body, "stream": True}))
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error"
    assert "device lost" in failed.json()["error"]["message"]
    assert streamed[-2]["error"]["code"] == "generation_failed"
    assert streamed[-1] == "[DONE]"
    assert httpx.post(f"{url}/v1/completions", json=body).json()["usage"]["completion_tokens"] == 4


def test_shutdown_lets_in_flight_streams_finish(model_dirs):
    decoder = SpeculativeDecoder(model_dirs["plain"], device="cpu")
    with serving(create_app(decoder, model_name="alone")) as running:
        body = {
            "model": "alone",
            "prompt": "hi",
            "max_tokens": 120,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with (
            httpx.Client(base_url=running.url, timeout=60) as session,
            session.stream("POST", "/v1/completions", json=body) as stream,
        ):
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            running.server.should_exit = True
            rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["usage"]["completion_tokens"] == 120
        running.thread.join(30)
        assert not running.thread.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.url}/health")


def test_the_worker_refuses_jobs_past_its_slots_and_queue_limit_and_after_closing(reference):
    """The worker is never started here, so every accepted job stays in the queue: the free slots and two more."""
    slots = reference.new_engine().capacity

    async def submit_past_the_limit() -> list[tuple[int, str | None]]:
        worker = GenerationWorker(reference.new_engine(), ServerMetrics(), max_queue=2)
        outcomes = []
        for _ in range(slots + 3):
            try:
                worker.submit(Generations([(reference.request("hi", max_new_tokens=2), 1)], time.perf_counter()))
                outcomes.append((200, None))
            except APIError as error:
                outcomes.append((error.status, error.headers.get("Retry-After")))
        worker.close(timeout=1)
        try:
            worker.submit(Generations([(reference.request("hi", max_new_tokens=2), 1)], time.perf_counter()))
        except APIError as error:
            outcomes.append((error.status, error.headers.get("Retry-After")))
        return outcomes

    assert asyncio.run(submit_past_the_limit()) == [(200, None)] * (slots + 2) + [(503, "1"), (503, None)]


def test_serve_command_reports_a_bad_model_path(tmp_path, capsys):
    assert main(["serve", "--target", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_command_takes_target_draft_and_gamma_from_a_config_and_binds_locally(
    model_dirs, tmp_path, monkeypatch, capsys
):
    started, warmed = {}, []

    def run(server: uvicorn.Server, sockets: list) -> None:
        started.update(app=server.config.app, address=sockets[0].getsockname())

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(SpeculativeDecoder, "warm_up", lambda decoder, gamma: warmed.append(gamma))
    config = {"target": str(model_dirs["target"]), "draft": str(model_dirs["draft"]), "gamma": 2}
    (tmp_path / "best_config.json").write_text(json.dumps(config))
    assert main(["serve", "--config", str(tmp_path / "best_config.json"), "--device", "cpu", "--port", "0"]) == 0
    served = started["app"].state.served
    assert (served.name, served.gamma) == (str(model_dirs["target"]), 2)
    assert served.decoder.draft.name == str(model_dirs["draft"])
    assert started["address"][0] == "127.0.0.1"
    assert warmed == [2]  # step shapes are warmed before the server takes requests
    progress = [line.split(" ")[0] for line in capsys.readouterr().err.splitlines()]
    assert progress == ["config", "loading", "warming", "Host", "serving"]


def test_the_command_line_works_without_the_web_packages(monkeypatch, capsys):
    """The GPU image has no FastAPI: listing subcommands must not import it, and `serve` must say what is missing."""
    for name in ("fastapi", "uvicorn", "starlette", "prometheus_client", "speculor.server.app"):
        monkeypatch.setitem(sys.modules, name, None)
    importlib.reload(speculor.server)
    importlib.reload(speculor.server.command)
    assert main(["serve", "--target", "anything"]) == 2
    assert "needs fastapi, uvicorn" in capsys.readouterr().err
