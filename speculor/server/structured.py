"""Structured outputs and forced tool calls on the OpenAI-compatible endpoints.

Reads, from a request's extra fields, OpenAI's `response_format` (`json_object`; `json_schema` with its `schema`;
its `strict` is accepted, and the answer always follows the schema exactly), vLLM's extensions (`guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`, and `structured_outputs` holding one of `json`, `regex`,
`choice`, `grammar`, `json_object`) and OpenAI's `tools` with a `tool_choice` that forces a call ("required", or a
named function), and turns them into one `speculor.grammar.StructuredOutput` compiled for the served tokenizer
(`speculor.grammar`: the grammar masks the draft's and the target's logits alike, so the answer is the target
alone's under the grammar).

A forced tool call is generated as one JSON object `{"name": ..., "arguments": {...}}` whose name is one of the
allowed functions' and whose arguments follow that function's `parameters` schema; `as_tool_call` returns it as
OpenAI's `tool_calls` with finish reason "tool_calls", and `ToolCallStream` streams it as OpenAI does (the id and
name, then the arguments in pieces). `tool_choice` "auto" (OpenAI's default once tools are given) needs a parser
for the model's own way of writing a call among free text: with `speculor serve --tool-call-parser hermes` such a
request is generated freely, the tools passed to the chat template, and the calls read from the text
(`speculor.server.tool_parsers`); without it, "auto" is refused with a 400 naming it. So are two structures in one
request, tools sent to completions, and an invalid schema, regex or grammar — each naming the parameter.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from speculor.errors import SpeculorError
from speculor.grammar import CompiledStructure, StructuredOutput
from speculor.server.errors import APIError, echo

if TYPE_CHECKING:
    from speculor.api import SpeculativeDecoder

# The extra fields this module reads; `refused_option` lets them through to it.
STRUCTURED_OPTIONS = frozenset(
    {
        "response_format",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "structured_outputs",
        "tools",
        "tool_choice",
    }
)
BACKENDS = frozenset({"auto", "xgrammar"})


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def _schema(param: str, value: Any) -> dict[str, Any]:
    """A JSON schema given as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise _invalid(param, f"the schema is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise _invalid(param, f"a JSON schema must be a JSON object, got {echo(json.dumps(value))}")
    return value


def _response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _invalid("response_format", "must be an object with a 'type' ('text', 'json_object' or 'json_schema')")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json_object()
    if kind != "json_schema":
        raise _invalid("response_format", f"unknown type {echo(kind)}: use 'text', 'json_object' or 'json_schema'")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise _invalid("response_format.json_schema", "must be an object holding the 'schema' (and a 'name')")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _invalid("response_format.json_schema.strict", f"must be true or false, got {echo(json.dumps(strict))}")
    # Strict or not, the answer follows the schema exactly (OpenAI's strict mode), with no property the schema does
    # not name unless it allows them explicitly (as vLLM compiles schemas).
    return StructuredOutput.json_schema(_schema("response_format.json_schema.schema", spec["schema"]))


def _guided(param: str, value: Any) -> StructuredOutput:
    """One of vLLM's guided_* fields (or `structured_outputs`' key, named as `param`)."""
    try:
        if param.endswith("json"):
            return StructuredOutput.json_schema(_schema(param, value))
        if param.endswith("regex"):
            return StructuredOutput.regex(value)
        if param.endswith("choice"):
            return StructuredOutput.choice(value)
        return StructuredOutput.grammar(value)
    except SpeculorError as error:
        raise _invalid(param, str(error)) from None


def _structured_outputs(value: Any) -> StructuredOutput:
    if not isinstance(value, dict):
        raise _invalid("structured_outputs", "must be an object with one of 'json', 'regex', 'choice', 'grammar'")
    given = {key: item for key, item in value.items() if item not in (None, False)}
    if given.keys() == {"json_object"}:
        return StructuredOutput.json_object()
    if len(given) != 1 or not given.keys() <= {"json", "regex", "choice", "grammar"}:
        raise _invalid(
            "structured_outputs",
            f"give exactly one of 'json', 'regex', 'choice', 'grammar', 'json_object'; got {echo(', '.join(given))}",
        )
    ((key, item),) = given.items()
    return _guided(f"structured_outputs.{key}", item)


def _tools(tools: Any) -> dict[str, dict[str, Any]]:
    """The functions of `tools`, by name, each with its parameters' schema."""
    if not isinstance(tools, list):
        raise _invalid("tools", "must be a list of {'type': 'function', 'function': {...}}")
    functions: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _invalid(f"tools[{index}]", "must be {'type': 'function', 'function': {'name': ..., ...}}")
        parameters = function.get("parameters")
        functions[function["name"]] = (
            _schema(f"tools[{index}].function.parameters", parameters)
            if parameters is not None
            else {"type": "object", "properties": {}}
        )
    return functions


def _forced_tool_call(tools: Any, choice: Any, tool_call_parser: str | None = None) -> StructuredOutput | None:
    """The structure of a forced call, None for `tool_choice` "none" and for "auto" under a `tool_call_parser`
    (generated freely, the calls parsed from the text); "auto" without one is refused."""
    if choice == "none":
        return None
    if choice == "auto" or choice is None:
        if tool_call_parser is not None:
            _tools(tools)
            return None
        raise APIError(
            400,
            "tool_choice 'auto' (the default once tools are given) needs a parser for this model's own way of "
            "writing tool calls, and this server has none: send tool_choice 'required' or a named function, or "
            "start the server with --tool-call-parser hermes",
            param="tool_choice",
            code="unsupported_parameter",
        )
    functions = _tools(tools)
    if not functions:
        raise _invalid("tool_choice", "forces a tool call, but no tools are given")
    if choice != "required":
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str) or choice.get("type") != "function":
            raise _invalid("tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', 'function': ...}")
        if name not in functions:
            raise _invalid("tool_choice", f"names the function {echo(name)}, which is not among the tools")
        functions = {name: functions[name]}
    calls = [
        {
            "type": "object",
            "properties": {"name": {"enum": [name]}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in functions.items()
    ]
    return StructuredOutput.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls}, strict=True)


def requested_structure(
    extra: dict[str, Any], chat: bool, tool_call_parser: str | None = None
) -> tuple[str, StructuredOutput] | None:
    """The structure a request's extra fields ask for, with the parameter that asked, or None. Raises a 400
    `APIError` naming the parameter for a malformed value, two structures in one request, or tools outside `chat`
    (completions have no tool calls to answer with). Under a `tool_call_parser`, tool_choice "auto" asks for
    none."""
    backend = extra.get("guided_decoding_backend")
    if backend is not None and backend not in BACKENDS:
        raise _invalid("guided_decoding_backend", f"this server uses xgrammar; got {echo(str(backend))}")
    found: list[tuple[str, StructuredOutput]] = []
    if extra.get("response_format") is not None:
        structure = _response_format(extra["response_format"])
        if structure is not None:
            found.append(("response_format", structure))
    for param in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if extra.get(param) is not None:
            found.append((param, _guided(param, extra[param])))
    if extra.get("structured_outputs") is not None:
        found.append(("structured_outputs", _structured_outputs(extra["structured_outputs"])))
    if extra.get("tools") or extra.get("tool_choice") not in (None, "none"):
        if not chat:
            param = "tools" if extra.get("tools") else "tool_choice"
            raise _invalid(param, "tool calls are answered by /v1/chat/completions, not by completions")
        call = _forced_tool_call(extra.get("tools"), extra.get("tool_choice"), tool_call_parser)
        if call is not None:
            found.append(("tool_choice", call))
    if len(found) > 1:
        raise _invalid(found[1][0], f"asks for a second structure beside {found[0][0]}: send one")
    return found[0] if found else None


def compiled_structure(
    extra: dict[str, Any], decoder: SpeculativeDecoder, chat: bool, tool_call_parser: str | None = None
) -> CompiledStructure | None:
    """`requested_structure` compiled for the decoder's tokenizer (cached), a schema, regex or grammar the library
    cannot compile refused with a 400 naming the parameter and the problem."""
    requested = requested_structure(extra, chat, tool_call_parser)
    if requested is None:
        return None
    param, structure = requested
    if decoder.tokenizer is None:
        raise _invalid(param, "structured outputs need a tokenizer, and this model has none")
    try:
        return decoder.compile_structure(structure)
    except SpeculorError as error:
        raise _invalid(param, str(error)) from None


def forces_tool_call(extra: dict[str, Any]) -> bool:
    return bool(extra.get("tools")) and extra.get("tool_choice") not in (None, "none", "auto")


def parses_tool_calls(extra: dict[str, Any], tool_call_parser: str | None) -> bool:
    """Whether a chat request's tool calls are to be read from freely generated text: tools given, tool_choice
    absent or "auto", and the server started with a parser."""
    return tool_call_parser is not None and bool(extra.get("tools")) and extra.get("tool_choice") in (None, "auto")


def tool_names(extra: dict[str, Any]) -> list[str]:
    """The names of a request's (already checked) tools."""
    return list(_tools(extra.get("tools") or []))


# The start of a forced call's text, up to its arguments (the schema puts the name first, with these separators).
CALL_OPENING = re.compile(r'\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """Turns one choice's streamed text, `{"name": "N", "arguments": {...}}`, into OpenAI's streamed tool-call
    entries: the call's id and name once the name is complete, then the arguments as they grow. The last character
    seen is held back until the end, as the closing brace of the wrapper comes last and is not part of them."""

    def __init__(self) -> None:
        self._text = ""
        self._sent = 0
        self._opened = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The entries for the text so far, given its newest piece; empty until the name is complete."""
        self._text += text
        return self._entries(hold_back=1)

    def finish(self, complete: bool) -> list[dict[str, Any]]:
        """The rest of the arguments: without the wrapper's closing brace where the call is `complete`, all of what
        came where it was cut short."""
        return self._entries(hold_back=1 if complete else 0)

    def _entries(self, hold_back: int) -> list[dict[str, Any]]:
        opening = CALL_OPENING.match(self._text)
        if opening is None:
            return []
        entries: list[dict[str, Any]] = []
        if not self._opened:
            self._opened = True
            name = json.loads(opening.group(1))
            entries.append(
                {"index": 0, "id": _call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
            )
        arguments = self._text[opening.end() : len(self._text) - hold_back]
        if len(arguments) > self._sent:
            entries.append({"index": 0, "function": {"arguments": arguments[self._sent :]}})
            self._sent = len(arguments)
        return entries


def as_tool_call(choice: dict[str, Any]) -> dict[str, Any]:
    """A whole chat choice answering a forced tool call, as OpenAI returns one: a complete call becomes the
    message's `tool_calls` (content null) with finish reason "tool_calls"; a call cut short (max_tokens) stays as
    text with its own finish reason."""
    content = choice["message"]["content"]
    opening = CALL_OPENING.match(content)
    if choice["finish_reason"] != "stop" or opening is None:
        return choice
    # The arguments as generated (the text between the opening and the wrapper's closing brace), as the stream
    # sends them.
    arguments = content[opening.end() : -1]
    tool_call = {
        "id": _call_id(),
        "type": "function",
        "function": {"name": json.loads(opening.group(1)), "arguments": arguments},
    }
    message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    return {**choice, "message": message, "finish_reason": "tool_calls"}
