"""tool_choice "auto" with `--tool-call-parser hermes`: the Hermes parser on its own (whole texts and streamed
pieces), the chat format that answers with its calls, and the server: tools without tool_choice are refused without
the parser and generated freely with it, the tools reaching the chat template."""

from __future__ import annotations

import json

import httpx
import pytest
from server_support import GAMMA, MODEL, serving, sse_events

from speculor.engine import Delta, GenerationResult, GenerationStats
from speculor.server.app import ParsedToolCallFormat
from speculor.server.tool_parsers import HermesStream, parse_hermes

NAMES = ["get_weather", "add"]
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
ADD_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS_TEMPLATE = (
    "{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
    "{% for message in messages %}<|{{ message.role }}|>{{ message.content }}"
    "{% for called in message.tool_calls or [] %}<call>{{ called.function.name }}({{ called.function.arguments.city }})"
    "</call>{% endfor %}{% if message.tool_call_id %}[{{ message.tool_call_id }}]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def call(name: str, arguments: dict) -> dict:
    return {"name": name, "arguments": arguments}


def calls_of(tool_calls: list[dict]) -> list[dict]:
    return [call(entry["function"]["name"], json.loads(entry["function"]["arguments"])) for entry in tool_calls]


def test_text_alone_is_no_call():
    assert parse_hermes("Hello, there is no call here.", NAMES) is None
    assert parse_hermes("", NAMES) is None


def test_one_call():
    content, calls = parse_hermes(WEATHER_CALL, NAMES)
    assert content is None
    assert calls_of(calls) == [call("get_weather", {"city": "Paris", "unit": "c"})]
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")


def test_two_calls():
    content, calls = parse_hermes(f"{WEATHER_CALL}\n{ADD_CALL}\n", NAMES)
    assert content is None
    assert calls_of(calls) == [call("get_weather", {"city": "Paris", "unit": "c"}), call("add", {"a": 1, "b": 2})]
    assert calls[0]["id"] != calls[1]["id"]


def test_text_then_a_call():
    content, calls = parse_hermes(f"Let me look.\n\n{ADD_CALL}", NAMES)
    assert content == "Let me look."
    assert calls_of(calls) == [call("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',  # malformed JSON
        '<tool_call>\n{"name": "divide", "arguments": {"a": 1}}\n</tool_call>',  # not among the tools
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}',  # never closed
        f'{ADD_CALL}\n<tool_call>\n{{"name": "add"',  # a second block cut short
        f"{ADD_CALL}\nand some text after it",
        '<tool_call>\n["add", {"a": 1}]\n</tool_call>',  # not an object
    ],
)
def test_a_bad_block_leaves_the_text_as_text(text):
    assert parse_hermes(text, NAMES) is None


def test_arguments_are_a_json_string():
    _, calls = parse_hermes(WEATHER_CALL, NAMES)
    arguments = calls[0]["function"]["arguments"]
    assert isinstance(arguments, str) and json.loads(arguments) == {"city": "Paris", "unit": "c"}
    # Arguments the model wrote as a JSON string are sent as the same JSON text of an object.
    _, calls = parse_hermes('<tool_call>{"name": "add", "arguments": "{\\"a\\": 3}"}</tool_call>', NAMES)
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 3}


def test_a_call_without_arguments_has_empty_ones():
    _, calls = parse_hermes('<tool_call>{"name": "add"}</tool_call>', NAMES)
    assert calls[0]["function"]["arguments"] == "{}"


def test_streaming_holds_back_what_could_start_a_call():
    stream = HermesStream(NAMES)
    pieces = [
        "Let me ",
        "check. <",
        "b>ok</b> <to",
        "ol_c",
        'all>\n{"name": "add", ',
        '"arguments": {"a": 1}}\n</tool',
        "_call>",
    ]
    sent = [stream.feed(piece) for piece in pieces]
    assert sent == ["Let me ", "check. ", "<b>ok</b> ", "", "", "", ""]
    rest, calls = stream.finish()
    assert rest == ""
    assert calls_of(calls) == [call("add", {"a": 1})]


def test_streaming_flushes_the_held_text_when_no_call_materialises():
    stream = HermesStream(NAMES)
    assert stream.feed("a <tool") == "a "
    assert stream.feed("_call> not json </tool_call>") == ""
    assert stream.finish() == ("<tool_call> not json </tool_call>", [])
    stream = HermesStream(NAMES)
    assert stream.feed("ends with <tool_c") == "ends with "
    assert stream.finish() == ("<tool_c", [])


def result(text: str, finish_reason: str = "eos") -> GenerationResult:
    return GenerationResult(text, [0] * 3, GenerationStats(), finish_reason)


def test_the_chat_format_answers_with_the_calls():
    form = ParsedToolCallFormat(MODEL, str, tool_names=NAMES)
    choice = form.choice(0, f"Sure.\n{ADD_CALL}", "stop", None, whole=True)
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure."
    assert calls_of(choice["message"]["tool_calls"]) == [call("add", {"a": 1, "b": 2})]
    plain = form.choice(0, "Just text.", "stop", None, whole=True)
    assert plain["message"] == {"role": "assistant", "content": "Just text."} and plain["finish_reason"] == "stop"


def test_the_chat_format_streams_text_then_the_calls_then_the_finish():
    form = ParsedToolCallFormat(MODEL, str, tool_names=NAMES)
    text = f"Sure. {WEATHER_CALL}\n{ADD_CALL}"
    chunks = [form.delta_chunk(0, Delta([1], text[start : start + 5])) for start in range(0, len(text), 5)]
    chunks = [chunk for chunk in chunks if chunk is not None]
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks) == "Sure. "
    entries_chunk, finish = form.final_chunks(0, result(text))
    entries = entries_chunk["choices"][0]["delta"]["tool_calls"]
    assert [entry["index"] for entry in entries] == [0, 1]
    assert all(entry["id"].startswith("call_") and entry["type"] == "function" for entry in entries)
    assert calls_of(entries) == [call("get_weather", {"city": "Paris", "unit": "c"}), call("add", {"a": 1, "b": 2})]
    assert finish["choices"][0]["finish_reason"] == "tool_calls" and finish["choices"][0]["delta"] == {}


def test_the_chat_format_streams_held_text_when_there_is_no_call():
    form = ParsedToolCallFormat(MODEL, str, tool_names=NAMES)
    assert form.delta_chunk(0, Delta([1], "x <tool_"))["choices"][0]["delta"] == {"content": "x "}
    held, finish = form.final_chunks(0, result("x <tool_"))
    assert held["choices"][0]["delta"] == {"content": "<tool_"}
    assert finish["choices"][0]["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def servers(model_dirs, one_torch_thread):
    """The tiny pair served with a template that shows the tools, without and with the parser."""
    from speculor import SpeculativeDecoder
    from speculor.server import create_app

    decoder = SpeculativeDecoder(model_dirs["target"], model_dirs["draft"], device="cpu")
    options = dict(gamma=GAMMA, model_name=MODEL, chat_template=TOOLS_TEMPLATE)
    with (
        serving(create_app(decoder, **options)) as plain,
        serving(create_app(decoder, tool_call_parser="hermes", **options)) as parsing,
    ):
        yield plain.url, parsing.url


def chat(url: str, **body) -> httpx.Response:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_auto_is_refused_without_the_parser_and_answered_with_it(servers):
    plain, parsing = servers
    for tool_choice in ({}, {"tool_choice": "auto"}):
        refused = chat(plain, tools=[WEATHER], **tool_choice)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "tool_choice" and "--tool-call-parser hermes" in error["message"]
        answered = chat(parsing, tools=[WEATHER], **tool_choice)
        assert answered.status_code == 200, answered.text
        choice = answered.json()["choices"][0]
        # The tiny model writes no call: its text is the content.
        assert isinstance(choice["message"]["content"], str) and "tool_calls" not in choice["message"]
        assert choice["finish_reason"] in ("stop", "length")


def test_a_malformed_tool_is_refused_under_the_parser(servers):
    _, parsing = servers
    refused = chat(parsing, tools=[{"type": "function", "function": {"description": "no name"}}])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools[0]", refused.text


def test_the_tools_reach_the_chat_template(servers):
    _, parsing = servers
    without = chat(parsing).json()["usage"]["prompt_tokens"]
    with_tools = chat(parsing, tools=[WEATHER]).json()["usage"]["prompt_tokens"]
    assert with_tools > without


def test_a_streamed_auto_answer_equals_the_whole_one(servers):
    _, parsing = servers
    whole = chat(parsing, tools=[WEATHER]).json()["choices"][0]
    with httpx.stream(
        "POST",
        f"{parsing}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": 6,
            "temperature": 0,
            "tools": [WEATHER],
            "stream": True,
        },
        timeout=60,
    ) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    text = "".join(event["choices"][0]["delta"].get("content", "") for event in events[:-1] if event["choices"])
    assert text == whole["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_forced_calls_still_work_under_the_parser(servers):
    _, parsing = servers
    answer = chat(parsing, tools=[WEATHER], tool_choice="required", max_tokens=60).json()["choices"][0]
    if answer["finish_reason"] == "tool_calls":
        assert answer["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    else:  # cut short by max_tokens: the text so far
        assert answer["finish_reason"] == "length"


def agent_history(arguments: str) -> list[dict]:
    """A conversation as an agent loop sends it back: the user, the assistant's call, the tool's answer."""
    called = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [called]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 C"},
    ]


def test_earlier_calls_and_tool_answers_reach_the_chat_template(servers):
    _, parsing = servers
    history = agent_history('{"city": "Paris"}')
    stripped = [{"role": message["role"], "content": message["content"]} for message in history]
    with_calls = chat(parsing, messages=history)
    assert with_calls.status_code == 200, with_calls.text
    # The template writes "<call>get_weather(Paris)</call>" and "[call_1]" only from the calls and the call id.
    without = chat(parsing, messages=stripped).json()["usage"]["prompt_tokens"]
    assert with_calls.json()["usage"]["prompt_tokens"] > without


@pytest.mark.parametrize("arguments", ["not json", "[1, 2]"])
def test_earlier_call_arguments_that_are_no_json_object_are_refused(servers, arguments):
    _, parsing = servers
    refused = chat(parsing, messages=agent_history(arguments))
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"
