"""Structured outputs and forced tool calls through `speculor serve`, with the official `openai` client: OpenAI's
`response_format` and `tools` with a forced `tool_choice`, vLLM's guided_* and `structured_outputs` extras. Greedy
answers equal the offline decoder's with the same structure (speculation on in both); every answer follows its
structure; what cannot be served is refused with a 400 naming the parameter."""

from __future__ import annotations

import json
import re

import openai
import pytest
from openai import OpenAI
from server_support import CHAT_TEMPLATE, GAMMA, MODEL

from speculor import StructuredOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = 120
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "kind": {"enum": ["home", "work"]},
        "floors": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
    },
    "required": ["city", "zip", "kind", "floors"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer"}},
            "required": ["a"],
        },
    },
}
MESSAGES = [{"role": "user", "content": "Where do you live?"}]


@pytest.fixture
def client(server_url) -> OpenAI:
    return OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat_prompt(reference) -> list[int]:
    return reference.tokenizer.apply_chat_template(
        MESSAGES, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=False
    )


def follows(value: dict) -> bool:
    return (
        set(value) == {"city", "zip", "kind", "floors"}
        and isinstance(value["city"], str)
        and len(value["city"]) <= 6
        and re.fullmatch("[0-9]{5}", value["zip"]) is not None
        and value["kind"] in {"home", "work"}
        and len(value["floors"]) <= 2
        and all(isinstance(floor, int) and 0 <= floor <= 9 for floor in value["floors"])
    )


def test_chat_json_schema_equals_the_offline_decoder_and_validates(client, reference):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=TOKENS,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "address", "schema": SCHEMA, "strict": True}},
    )
    offline = reference.generate(
        chat_prompt(reference),
        max_new_tokens=TOKENS,
        gamma=GAMMA,
        structured=StructuredOutput.json_schema(SCHEMA, strict=True),
    )
    content = answer.choices[0].message.content
    assert content == offline.text and answer.choices[0].finish_reason == "stop"
    assert follows(json.loads(content))
    assert answer.speculative["accepted"] > 0


def test_sampled_chat_json_object_and_schema_answers_follow_them(client):
    for seed in range(3):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=TOKENS,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "address", "schema": SCHEMA}},
        )
        assert follows(json.loads(answer.choices[0].message.content))
    answer = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=TOKENS, temperature=0, response_format={"type": "json_object"}
    )
    content = answer.choices[0].message.content
    assert content.startswith("{")
    assert answer.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict)


def test_a_named_tool_choice_returns_a_tool_call_under_its_schema(client, reference):
    answer = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=TOKENS,
        temperature=0,
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in {"c", "f"} and len(arguments["city"]) <= 8
    weather = WEATHER["function"]
    forced = {
        "type": "object",
        "properties": {"name": {"enum": [weather["name"]]}, "arguments": weather["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    offline = reference.generate(
        chat_prompt(reference),
        max_new_tokens=TOKENS,
        gamma=GAMMA,
        structured=StructuredOutput.json_schema(forced, strict=True),
    )
    assert json.loads(offline.text) == {"name": "get_weather", "arguments": arguments}


def test_tool_choice_required_calls_one_of_the_tools(client):
    for seed in range(3):
        answer = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=TOKENS,
            temperature=1.0,
            seed=seed,
            tools=[WEATHER, ADD],
            tool_choice="required",
        )
        (call,) = answer.choices[0].message.tool_calls
        arguments = json.loads(call.function.arguments)
        if call.function.name == "add":
            assert 0 <= arguments["a"] <= 99 and set(arguments) <= {"a", "b"}
        else:
            assert call.function.name == "get_weather" and arguments["unit"] in {"c", "f"}


@pytest.mark.parametrize(
    "tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"], ids=["named", "required"]
)
def test_a_streamed_tool_call_arrives_in_pieces_and_equals_the_whole_answer(client, tool_choice):
    options = dict(
        model=MODEL, messages=MESSAGES, max_tokens=TOKENS, temperature=0, tools=[WEATHER, ADD], tool_choice=tool_choice
    )
    whole = client.chat.completions.create(**options).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **options))
    pieces = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or []]
    opening, *rest = pieces
    assert opening.id.startswith("call_") and opening.function.name == whole.function.name and opening.index == 0
    assert len(rest) > 1, "the arguments come in several pieces"
    assert "".join(piece.function.arguments for piece in rest) == whole.function.arguments
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "tool_calls"


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        ({"guided_regex": "[a-c]{2,4}-[0-9]{1,2}"}, "[a-c]{2,4}-[0-9]{1,2}"),
        ({"guided_choice": ["yes", "no", "maybe"]}, "yes|no|maybe"),
        ({"guided_grammar": 'root ::= "x = " [0-9] ("+" [0-9])?'}, r"x = [0-9](\+[0-9])?"),
        ({"structured_outputs": {"regex": "(GET|PUT) /[a-z]{1,5}"}}, "(GET|PUT) /[a-z]{1,5}"),
        ({"guided_json": {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}}, None),
    ],
)
def test_completions_follow_vllms_extras_and_equal_the_offline_decoder(client, reference, extra, pattern):
    answer = client.completions.create(
        model=MODEL, prompt="def f(x):", max_tokens=TOKENS, temperature=0, extra_body=extra
    )
    text = answer.choices[0].text
    assert answer.choices[0].finish_reason == "stop"
    if pattern is not None:
        assert re.fullmatch(pattern, text), text
    else:
        assert json.loads(text)["n"] in {1, 2}
    (name, value), *_ = extra.items()
    if name == "structured_outputs":
        name, value = "guided_regex", value["regex"]
    structure = {
        "guided_regex": StructuredOutput.regex,
        "guided_choice": StructuredOutput.choice,
        "guided_grammar": StructuredOutput.grammar,
        "guided_json": StructuredOutput.json_schema,
    }[name](value)
    assert text == reference.generate("def f(x):", max_new_tokens=TOKENS, gamma=GAMMA, structured=structure).text


@pytest.mark.parametrize(
    ("options", "param", "words"),
    [
        (dict(tools=[WEATHER]), "tool_choice", "'auto'"),
        (dict(tools=[WEATHER], tool_choice="auto"), "tool_choice", "parser"),
        (
            dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}),
            "response_format",
            "objekt",
        ),
        (dict(response_format={"type": "xml"}), "response_format", "xml"),
        (dict(extra_body={"guided_regex": "[a-"}), "guided_regex", "regex"),
        (dict(extra_body={"guided_grammar": "root ::= nowhere"}), "guided_grammar", "nowhere"),
        (dict(extra_body={"guided_choice": "yes"}), "guided_choice", "list"),
        (
            dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"}),
            "guided_regex",
            "second structure",
        ),
    ],
)
def test_what_cannot_be_served_is_refused_naming_the_parameter(client, options, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, **options)
    error = refused.value.body
    assert error["param"] == param and words in error["message"], error


def test_completions_refuse_tools(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=4, extra_body={"tools": [WEATHER], "tool_choice": "required"}
        )
    assert refused.value.body["param"] == "tools" and "chat/completions" in refused.value.body["message"]
