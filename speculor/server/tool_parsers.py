"""Tool calls a model writes itself, for `tool_choice` "auto" (`speculor serve --tool-call-parser hermes`).

Forced calls ("required", a named function) are generated under a JSON grammar (`speculor.server.structured`), so
their text is known to be one call. Under "auto" the model is free to answer with text, a call, or both, in its own
format, and the server must find the calls in what it wrote. This module reads the Hermes format (Hermes 2 Pro,
Qwen 2.5 and Qwen 3 chat templates; vLLM's `--tool-call-parser hermes`): one or more blocks

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

possibly after some text. Only complete blocks whose JSON parses and whose name is among the request's tools count;
a text with any other block (malformed, unknown name, cut short) is answered as plain text, as the model wrote it.
Pure functions and a small streaming helper, no FastAPI.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from typing import Any

PARSERS = ("hermes",)
OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_hermes(text: str, names: Collection[str]) -> tuple[str | None, list[dict[str, Any]]] | None:
    """The content (the text before the first block, stripped; None if empty) and the OpenAI `tool_calls` of
    `text`, or None when it holds no valid call: no block, or any block that is malformed, names a function outside
    `names`, or is not closed. Only whitespace may lie between and after the blocks."""
    start = text.find(OPEN)
    if start < 0:
        return None
    calls: list[dict[str, Any]] = []
    position = start
    for block in _BLOCK.finditer(text, start):
        if text[position : block.start()].strip():
            return None
        try:
            call = json.loads(block.group(1))
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(
            {
                "id": _call_id(),
                "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        )
        position = block.end()
    if not calls or text[position:].strip():
        return None
    content = text[:start].strip()
    return (content or None), calls


def _held_from(text: str) -> int:
    """Where the text that could be the start of a block begins: the first `<tool_call>`, else the longest suffix
    that is a prefix of it, else the end."""
    found = text.find(OPEN)
    if found >= 0:
        return found
    for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:length]):
            return len(text) - length
    return len(text)


class HermesStream:
    """One streamed choice under "auto": `feed` returns the content that is safe to send (all text before anything
    that could be a block's start), holding back the rest; `finish` parses the whole text and returns the held
    content still to send (all of it when no call materialises, else none) and the calls (empty when none)."""

    def __init__(self, names: Collection[str]) -> None:
        self.names = names
        self._text = ""
        self._sent = 0

    def feed(self, text: str) -> str:
        self._text += text
        safe = _held_from(self._text)
        if safe <= self._sent:
            return ""
        out = self._text[self._sent : safe]
        self._sent = safe
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        parsed = parse_hermes(self._text, self.names)
        if parsed is None:
            rest = self._text[self._sent :]
            self._sent = len(self._text)
            return rest, []
        self._sent = len(self._text)
        return "", parsed[1]


def stream_entries(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls as streamed `tool_calls` entries, one per call with its index and the whole arguments."""
    return [{"index": index, **call} for index, call in enumerate(calls)]
