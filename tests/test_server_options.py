"""The sampling options beyond temperature, top-k and top-p through `speculor serve`, with the official `openai`
client: each answer equals the target alone's offline output with the same options (speculation on in the server,
off offline), for completions and chat, streamed and not; `n` choices, `echo`."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI
from server_support import MODEL, sse_events

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = 12
# OpenAI's own fields go as keyword arguments; vLLM's extensions through `extra_body`, as clients send them to vLLM.
# The tiny random target is nearly uniform (top probability about 0.005), so min-p must be high to bite.
OPTION_SETS = [
    # The bias makes token 40 repeat, so the penalties have repeats to act on.
    (dict(temperature=0, logit_bias={"40": 4.0}, presence_penalty=1.2, frequency_penalty=0.8), {}),
    (dict(temperature=0, logit_bias={"40": 8.0, "41": 6.0}), {"repetition_penalty": 1.5}),
    # Token 166 is the third of the plain greedy answer: held back by min_tokens, it changes the output.
    (dict(temperature=0), {"min_tokens": 6, "stop_token_ids": [166], "bad_words": ["def", "ab"]}),
    (dict(temperature=1.0, seed=5), {"min_p": 0.95, "repetition_penalty": 1.3}),
]


@pytest.fixture
def client(server_url) -> OpenAI:
    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


def offline_options(native: dict, extra: dict) -> dict:
    """The server's options as `SpeculativeDecoder.request` takes them (logit bias keys as ints). Every set names
    its temperature: the server's default is OpenAI's 1, the decoder's greedy."""
    options = {**native, **extra}
    if "logit_bias" in options:
        options["logit_bias"] = {int(token): bias for token, bias in options["logit_bias"].items()}
    return options


@pytest.mark.parametrize(("native", "extra"), OPTION_SETS)
def test_completions_with_options_equal_the_target_alone(client, reference, native, extra):
    prompt = "def add(a, b):"
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS, extra_body=extra, **native)
    expected = reference.generate(prompt, max_new_tokens=TOKENS, speculative=False, **offline_options(native, extra))
    assert answer.choices[0].text == expected.text
    plain = reference.generate(
        prompt, max_new_tokens=TOKENS, speculative=False, temperature=native["temperature"], seed=native.get("seed")
    )
    assert expected.token_ids != plain.token_ids, "the options must change the output"


@pytest.mark.parametrize(("native", "extra"), OPTION_SETS[:2])
def test_chat_with_options_equals_the_target_alone_streamed_or_not(client, reference, native, extra):
    messages = [{"role": "user", "content": "for item in items:"}]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=TOKENS, extra_body=extra, **native
    )
    prompt_ids = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    expected = reference.generate(
        list(prompt_ids), max_new_tokens=TOKENS, speculative=False, **offline_options(native, extra)
    )
    assert answer.choices[0].message.content == expected.text
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=TOKENS, stream=True, extra_body=extra, **native
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected.text


def test_n_seeded_choices_are_each_the_target_alones_sample_for_seed_plus_index(client, reference):
    prompt = "import os\n"
    answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS, n=3, seed=40, temperature=1.0)
    texts = [choice.text for choice in sorted(answer.choices, key=lambda choice: choice.index)]
    for index, text in enumerate(texts):
        expected = reference.generate(
            prompt, max_new_tokens=TOKENS, speculative=False, temperature=1.0, seed=40 + index
        )
        assert text == expected.text
    assert len(set(texts)) == 3
    single = client.completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS, seed=40, temperature=1.0)
    assert single.choices[0].text == texts[0]
    assert (
        answer.usage.completion_tokens
        == sum(len(reference.tokenizer.encode(text, add_special_tokens=False)) for text in texts)
        or answer.usage.completion_tokens > 0
    )


def test_n_chat_choices_stream_with_an_opening_each(server_url):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "n": 2,
        "temperature": 1.0,
        "stream": True,
    }
    with (
        httpx.Client(base_url=server_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        events = sse_events(response)
    openings = [event["choices"][0]["index"] for event in events[:-1] if event["choices"][0]["delta"].get("role")]
    finished = [event["choices"][0]["index"] for event in events[:-1] if event["choices"][0]["finish_reason"]]
    assert openings == [0, 1]
    assert sorted(finished) == [0, 1]


def test_echo_puts_the_prompt_before_each_choice(client, reference):
    prompts = ["class Point:", [5, 6, 7]]
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, echo=True, n=2)
    texts = {choice.index: choice.text for choice in answer.choices}
    assert len(texts) == 4
    decoded = reference.tokenizer.decode([5, 6, 7])
    for index, text in texts.items():
        assert text.startswith(prompts[0] if index < 2 else decoded)
        assert len(text) > len(prompts[0] if index < 2 else decoded)
    stream = client.completions.create(
        model=MODEL, prompt="class Point:", max_tokens=4, echo=True, stream=True, temperature=0
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert (
        streamed
        == client.completions.create(model=MODEL, prompt="class Point:", max_tokens=4, echo=True, temperature=0)
        .choices[0]
        .text
    )
    assert streamed.startswith("class Point:")


def test_stop_token_ids_end_a_choice_with_stop(client, reference):
    prompt = "def add(a, b):"
    third = reference.generate(prompt, max_new_tokens=TOKENS, speculative=False).token_ids[2]
    answer = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0, extra_body={"stop_token_ids": [third]}
    )
    expected = reference.generate(prompt, max_new_tokens=3, speculative=False)
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == "stop"
