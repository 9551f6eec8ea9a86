"""The FastAPI app: OpenAI's completions and chat completions endpoints over a `SpeculativeDecoder`.

Request flow: `schemas.parse_body` parses and checks the body (400 naming the field on any mistake); the handler
checks what needs the model (name, prompt length, chat template; 400/404) on a thread pool, builds one
`DecodeRequest` per prompt — whose own `SpeculorError` checks run before anything is generated — and queues them on
the `GenerationWorker`, which runs every admitted request in one continuous batch. The answer is one JSON object
with a choice per prompt, or with `stream: true` server-sent events in OpenAI's chunk format ending with
`data: [DONE]`. Log-probabilities are the target's, from its raw logits (before temperature, top-k and top-p).

Every answer carries `usage` and a `speculative` object (drafted, accepted, acceptance_rate,
mean_accepted_length). In a stream, each choice's `speculative` rides on the chunk carrying its `finish_reason`,
which every client reads; the `choices: []` usage chunk comes only when the client asks for it with
`stream_options: {"include_usage": true}` (and then every other chunk has `usage: null`), as OpenAI does, because
the SDKs' ordinary loop `chunk.choices[0]` fails on it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from speculor import __version__
from speculor.api import SpeculativeDecoder
from speculor.engine import DecodeRequest, Delta, GenerationResult, GenerationStats, TokenLogprob
from speculor.errors import SpeculorError
from speculor.server.errors import APIError, bounded, echo, install_error_handlers
from speculor.server.metrics import ServerMetrics
from speculor.server.schemas import (
    Body,
    ChatCompletionRequest,
    CompletionRequest,
    Prompt,
    SamplingRequest,
    parse_body,
)
from speculor.server.structured import (
    ToolCallStream,
    as_tool_call,
    compiled_structure,
    forces_tool_call,
    parses_tool_calls,
    tool_names,
)
from speculor.server.tool_parsers import PARSERS, HermesStream, parse_hermes, stream_entries
from speculor.server.worker import FINISH_REASONS, Generations, GenerationWorker

# OpenAI's default for /v1/completions when max_tokens is left out (chat defaults to the rest of the context).
DEFAULT_COMPLETION_TOKENS = 16

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
MODEL_PATH_PREFIX = "/v1/models/"

# The paths an API key leaves open unless told to protect them too: load balancers and Prometheus scrape them.
MONITORING_PATHS = frozenset({"/health", "/metrics"})


def byte_level_alphabet() -> dict[str, int]:
    """The characters byte-level BPE vocabularies (GPT-2's scheme) spell bytes with, mapped back to their bytes: the
    printable Latin-1 bytes stand for themselves, and every other byte, in byte order, for the next code point from
    256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {chr(byte): byte for byte in printable}
    others = (byte for byte in range(256) if chr(byte) not in alphabet)
    alphabet.update({chr(256 + position): byte for position, byte in enumerate(others)})
    return alphabet


BYTE_LEVEL_ALPHABET = byte_level_alphabet()
# A SentencePiece byte-fallback token: one byte, written as its hexadecimal value.
BYTE_FALLBACK_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def display_name(name: str) -> str:
    """A model as /health shows it: a local directory by its own name, so the server's file layout stays private; a
    Hub id as it is."""
    return os.path.basename(os.path.normpath(name)) if os.path.isabs(name) or os.path.exists(name) else name


class ServedModel:
    """The decoder behind the endpoints: checks a request against the model and turns it into `DecodeRequest`s.
    `gamma` None lets the engine choose γ each step from the load; an int fixes it for every request. `chat_template`
    (Jinja text) replaces the tokenizer's own for chat; None keeps the tokenizer's, if it has one.
    `tool_call_parser` ("hermes", or None) lets chat requests with tools leave tool_choice "auto"."""

    def __init__(
        self,
        decoder: SpeculativeDecoder,
        name: str,
        gamma: int | None,
        chat_template: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        self.decoder = decoder
        self.name = name
        self.gamma = gamma
        self.chat_template = chat_template
        self.tool_call_parser = tool_call_parser
        if chat_template is not None:
            self._check_chat_template(chat_template)
        runners = [decoder.target_runner, decoder.draft_runner]
        self.context_length = min(runner.max_length for runner in runners if runner is not None)

    def _check_chat_template(self, template: str) -> None:
        """Refuse, before serving, a template that cannot render a one-message conversation (a syntax error, an
        unknown filter) or a model without a tokenizer to apply it with."""
        tokenizer = self.decoder.tokenizer
        if tokenizer is None:
            raise SpeculorError("a chat template needs a tokenizer, and this model has none")
        try:
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}], chat_template=template, add_generation_prompt=True, tokenize=False
            )
        except (TemplateError, ValueError, TypeError) as error:
            raise SpeculorError(f"the chat template does not render a conversation: {error}") from error

    def check_model(self, model: str) -> None:
        if model != self.name:
            raise APIError(
                404,
                f"model {echo(model)} is not served here; this server has {echo(self.name)}",
                param="model",
                code="model_not_found",
            )

    def token_text(self, token_id: int) -> str:
        """A token as text, for log-probabilities; `token_id:N` where the model has no tokenizer (vLLM's form). A
        token holding part of a character's UTF-8 bytes decodes to "\ufffd", as every such token does."""
        tokenizer = self.decoder.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"

    def token_bytes(self, token_id: int) -> list[int]:
        """A token's own UTF-8 bytes, for chat log-probabilities' `bytes`: the bytes of its text, except for a token
        holding only part of a character (its text is "\ufffd"), whose bytes are read off its vocabulary entry —
        a byte-fallback `<0xNN>` or a byte-level BPE piece — so a client joining the bytes gets the character."""
        text = self.token_text(token_id)
        tokenizer = self.decoder.tokenizer
        if tokenizer is None or "\ufffd" not in text:
            return list(text.encode())
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if BYTE_FALLBACK_PIECE.fullmatch(piece):
                return [int(piece[3:5], 16)]
            if piece and all(character in BYTE_LEVEL_ALPHABET for character in piece):
                return [BYTE_LEVEL_ALPHABET[character] for character in piece]
        return list(text.encode())

    def completion(self, body: CompletionRequest) -> list[tuple[DecodeRequest, int]]:
        """`n` requests per prompt, prompt by prompt; an error names the prompt's position when there are several."""
        prompts = body.prompts
        requests = []
        for index, prompt in enumerate(prompts):
            param = f"prompt[{index}]" if len(prompts) > 1 else "prompt"
            requests += self._prompt_requests(body, prompt, param)
        return requests

    def echoed(self, body: CompletionRequest) -> list[str]:
        """The text each choice starts with under `echo`: its prompt's (text as sent; token ids decoded)."""
        tokenizer = self.decoder.tokenizer
        texts = []
        for prompt in body.prompts:
            if isinstance(prompt, str):
                texts.append(prompt)
            else:
                texts.append(tokenizer.decode(prompt) if tokenizer is not None else "")
        return [text for text in texts for _ in range(body.n)]

    def _prompt_requests(self, body: CompletionRequest, prompt: Prompt, param: str) -> list[tuple[DecodeRequest, int]]:
        try:
            prompt_ids = self.decoder.encode(prompt)
        except SpeculorError as error:
            raise APIError(400, f"{param}: {error}", param=param, code="invalid_prompt") from error
        return self._requests(body, prompt_ids, param, body.max_tokens, DEFAULT_COMPLETION_TOKENS)

    def chat(self, body: ChatCompletionRequest) -> list[tuple[DecodeRequest, int]]:
        tokenizer = self.decoder.tokenizer
        template = self.chat_template or getattr(tokenizer, "chat_template", None)
        if tokenizer is None or not template:
            raise APIError(
                400,
                f"model {self.name!r} has no chat template, so it cannot answer chat completions; use "
                "/v1/completions, or start the server with --chat-template FILE",
                param="messages",
                code="no_chat_template",
            )
        messages = [message.for_template(index) for index, message in enumerate(body.messages)]
        extra = body.model_extra or {}
        # Under "auto" the template decides how the tools reach the model; forced calls follow a grammar instead.
        tools = None
        if parses_tool_calls(extra, self.tool_call_parser):
            tool_names(extra)  # a malformed tool is refused naming it, before the template sees it
            tools = extra["tools"]
        try:
            prompt_ids = tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=template,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        except (TemplateError, ValueError) as error:
            raise APIError(
                400,
                f"the chat template rejected these messages: {bounded(str(error), 300)}",
                param="messages",
                code="invalid_messages",
            ) from error
        max_tokens = body.max_completion_tokens or body.max_tokens
        return self._requests(body, list(prompt_ids), "messages", max_tokens, None)

    def _requests(
        self,
        body: SamplingRequest,
        prompt_ids: list[int],
        prompt_param: str,
        max_tokens: int | None,
        default_tokens: int | None,
    ) -> list[tuple[DecodeRequest, int]]:
        """The `n` requests of one prompt. With a seed, choice j samples with seed + j: the first choice is what
        n = 1 gives, the others differ, and each is reproducible. Each choice prefills the prompt itself (no shared
        prefill yet)."""
        seeds = [None] * body.n if body.seed is None else [body.seed + choice for choice in range(body.n)]
        return [self._request(body, prompt_ids, prompt_param, max_tokens, default_tokens, seed) for seed in seeds]

    def _request(
        self,
        body: SamplingRequest,
        prompt_ids: list[int],
        prompt_param: str,
        max_tokens: int | None,
        default_tokens: int | None,
        seed: int | None,
    ) -> tuple[DecodeRequest, int]:
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise APIError(
                400,
                f"the prompt is {len(prompt_ids)} tokens long and this model's context length is "
                f"{self.context_length} tokens, which leaves no room to generate: shorten the prompt",
                param=prompt_param,
                code="context_length_exceeded",
            )
        alternatives = body.logprob_alternatives
        vocab_size = self.decoder.vocab_size
        if alternatives is not None and alternatives > vocab_size:
            raise APIError(
                400,
                f"{alternatives} alternatives per token were asked for, but this model has only {vocab_size} tokens",
                param="top_logprobs" if isinstance(body, ChatCompletionRequest) else "logprobs",
                code="invalid_value",
            )
        if max_tokens is None:
            max_tokens = room if default_tokens is None else min(default_tokens, room)
        elif max_tokens > room:
            raise APIError(
                400,
                f"max_tokens ({max_tokens}) plus the prompt ({len(prompt_ids)} tokens) exceeds this model's "
                f"context length of {self.context_length} tokens: ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if body.min_tokens > max_tokens:
            raise APIError(
                400,
                f"min_tokens ({body.min_tokens}) is more than the {max_tokens} tokens this request may generate",
                param="min_tokens",
                code="invalid_value",
            )
        chat = isinstance(body, ChatCompletionRequest)
        structure = compiled_structure(body.model_extra or {}, self.decoder, chat, self.tool_call_parser)
        named = [("logit_bias", int(key)) for key in body.logit_bias]
        named += [("stop_token_ids", token) for token in body.stop_token_ids]
        for param, token in named:
            if token >= vocab_size:
                raise APIError(
                    400,
                    f"token id {token} is outside this model's vocabulary of {vocab_size} tokens",
                    param=param,
                    code="invalid_value",
                )
        try:
            request = self.decoder.request(
                prompt_ids,
                max_new_tokens=max_tokens,
                gamma=self.gamma,
                temperature=body.temperature,
                top_k=body.top_k_within(vocab_size),
                top_p=body.top_p,
                seed=seed,
                stop=body.stop,
                ignore_eos=body.ignore_eos,
                logprobs=body.logprob_alternatives,
                min_p=body.min_p,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                logit_bias=body.token_bias(),
                min_tokens=body.min_tokens,
                stop_token_ids=body.stop_token_ids,
                bad_words=body.bad_words,
                structured=structure,
            )
        except SpeculorError as error:
            raise APIError(400, str(error), code="invalid_value") from error
        return request, len(prompt_ids)


def speculative_summary(stats: Sequence[GenerationStats]) -> dict[str, Any]:
    """Speculation counters of one or several generations, summed (the rates are of the sums)."""
    drafted = sum(s.drafted for s in stats)
    accepted = sum(s.accepted for s in stats)
    forwards = sum(s.target_forwards for s in stats)
    return {
        "drafted": drafted,
        "accepted": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_length": sum(s.new_tokens for s in stats) / forwards if forwards else 0.0,
    }


def usage(results: Sequence[GenerationResult], prompt_tokens: Sequence[int]) -> dict[str, int]:
    completion_tokens = sum(len(result.token_ids) for result in results)
    return {
        "prompt_tokens": sum(prompt_tokens),
        "completion_tokens": completion_tokens,
        "total_tokens": sum(prompt_tokens) + completion_tokens,
    }


class ResponseFormat:
    """The OpenAI envelope shared by both endpoints; subclasses shape the choices and their log-probabilities.
    With `include_usage`, stream chunks carry `usage: null` until the final usage chunk; with `continuous_usage`
    every chunk carries the usage so far (`prompt_tokens` is the request's). `token_text` turns a token id into the
    text shown next to its log-probability, `token_bytes` into its UTF-8 bytes (chat's `bytes`; by default its
    text's); `with_logprobs` says whether the request asked for them. `choices` is how many choices the answer has
    (prompts × n); `echoed`, where given, the text each choice starts with (completions' `echo`)."""

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(
        self,
        model: str,
        token_text: Callable[[int], str],
        *,
        token_bytes: Callable[[int], list[int]] | None = None,
        prompt_tokens: int = 0,
        include_usage: bool = False,
        continuous_usage: bool = False,
        with_logprobs: bool = False,
        choices: int = 1,
        echoed: Sequence[str] = (),
    ) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.token_text = token_text
        self.token_bytes = token_bytes or (lambda token_id: list(token_text(token_id).encode()))
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.continuous_usage = continuous_usage
        self.with_logprobs = with_logprobs
        self.choices = choices
        self.echoed = list(echoed) or [""] * choices
        self._completion_tokens = 0

    def _envelope(self, object_name: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _chunk(self, choices: list[dict], **extra: Any) -> dict[str, Any]:
        if self.continuous_usage:
            extra.setdefault(
                "usage",
                {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self._completion_tokens,
                    "total_tokens": self.prompt_tokens + self._completion_tokens,
                },
            )
        elif self.include_usage:
            extra.setdefault("usage", None)
        return self._envelope(self.chunk_object_name, choices, **extra)

    def _logprobs(self, index: int, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
        return self.logprobs_block(index, logprobs or []) if self.with_logprobs else None

    def response(self, generations: Generations, results: list[GenerationResult]) -> dict[str, Any]:
        choices = [
            self.choice(
                index,
                self.echoed[index] + (result.text or ""),
                FINISH_REASONS[result.finish_reason],
                self._logprobs(index, generations.logprobs[index]),
                whole=True,
            )
            for index, result in enumerate(results)
        ]
        return self._envelope(
            self.object_name,
            choices,
            usage=usage(results, generations.prompt_tokens),
            speculative=speculative_summary([result.stats for result in results]),
        )

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def delta_chunk(self, index: int, delta: Delta) -> dict[str, Any] | None:
        """The chunk for a step's new text (and log-probabilities), or None when it has nothing to show."""
        self._completion_tokens += len(delta.token_ids)
        if not delta.text and not (self.with_logprobs and delta.logprobs):
            return None
        return self._chunk([self.choice(index, delta.text, None, self._logprobs(index, delta.logprobs))])

    def final_chunks(self, index: int, result: GenerationResult) -> list[dict[str, Any]]:
        """The chunks ending choice `index`: by default only `final_chunk`."""
        return [self.final_chunk(index, result)]

    def final_chunk(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The chunk ending choice `index`: its finish reason and its speculation counters."""
        choice = self.choice(index, "", FINISH_REASONS[result.finish_reason], None)
        return self._chunk([choice], speculative=speculative_summary([result.stats]))

    def usage_chunk(self, generations: Generations, results: list[GenerationResult]) -> dict[str, Any]:
        return self._chunk(
            [],
            usage=usage(results, generations.prompt_tokens),
            speculative=speculative_summary([result.stats for result in results]),
        )

    def choice(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None, whole: bool = False
    ) -> dict[str, Any]:
        raise NotImplementedError

    def logprobs_block(self, index: int, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    """Legacy completions: log-probabilities as `tokens`, `token_logprobs`, `top_logprobs` (the alternatives and the
    chosen token, as OpenAI always includes it) and `text_offset` (each token's offset in the completion, counted
    over the tokens' own texts, so across a stream's chunks too). `top_logprobs` maps each token's text to its
    log-probability, so alternatives with the same text — above all the tokens holding part of a character's
    bytes, which all decode to "\ufffd" — share one entry, which holds the highest of their log-probabilities (the
    likeliest token with that text); such a position lists fewer entries than asked for."""

    id_prefix = "cmpl"
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._text_offsets: dict[int, int] = {}

    def choice(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None, whole: bool = False
    ) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Under `echo`, each choice's prompt text first."""
        return [self._chunk([self.choice(index, text, None, None)]) for index, text in enumerate(self.echoed) if text]

    def logprobs_block(self, index: int, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        tokens = [self.token_text(entry.token_id) for entry in logprobs]
        offsets = []
        offset = self._text_offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        self._text_offsets[index] = offset
        top = [self._alternatives(token, entry) for token, entry in zip(tokens, logprobs, strict=True)]
        return {
            "tokens": tokens,
            "token_logprobs": [entry.logprob for entry in logprobs],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def _alternatives(self, token: str, entry: TokenLogprob) -> dict[str, float]:
        """One position's `top_logprobs`: text → the highest log-probability of the alternatives with that text, best
        first, and the chosen token's."""
        alternatives: dict[str, float] = {}
        for alternative, value in (*entry.top, (entry.token_id, entry.logprob)):
            text = token if alternative == entry.token_id else self.token_text(alternative)
            if text not in alternatives or value > alternatives[text]:
                alternatives[text] = value
        return alternatives


class ChatFormat(ResponseFormat):
    """Chat completions: log-probabilities as `content`, one entry per token with its UTF-8 `bytes` and its
    `top_logprobs`, a list holding every alternative asked for, each with its own bytes (a token holding part of a
    character has the text "\ufffd" and that part's bytes, so joining the tokens' bytes gives the text)."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def choice(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None, whole: bool = False
    ) -> dict[str, Any]:
        if whole:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        delta = {"content": text} if text else {}
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening_chunks(self) -> list[dict[str, Any]]:
        return [
            self._chunk(
                [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for index in range(self.choices)
        ]

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.token_text(token_id), "logprob": logprob, "bytes": self.token_bytes(token_id)}

    def logprobs_block(self, index: int, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        content = [
            {
                **self._token(entry.token_id, entry.logprob),
                "top_logprobs": [self._token(alternative, value) for alternative, value in entry.top],
            }
            for entry in logprobs
        ]
        return {"content": content, "refusal": None}


class ToolCallFormat(ChatFormat):
    """Chat answers to a forced tool call: each whole choice as OpenAI's `tool_calls` (`as_tool_call`); streamed, the
    call's id and name, then its arguments in pieces (`ToolCallStream`), then finish reason "tool_calls"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._calls: dict[int, ToolCallStream] = {}

    def choice(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None, whole: bool = False
    ) -> dict[str, Any]:
        choice = super().choice(index, text, finish_reason, logprobs, whole)
        return as_tool_call(choice) if whole else choice

    def delta_chunk(self, index: int, delta: Delta) -> dict[str, Any] | None:
        super().delta_chunk(index, Delta(delta.token_ids, ""))  # counts the tokens; a call streams no content
        entries = self._calls.setdefault(index, ToolCallStream()).feed(delta.text)
        return self._call_chunk(index, entries, None) if entries else None

    def final_chunk(self, index: int, result: GenerationResult) -> dict[str, Any]:
        reason = FINISH_REASONS[result.finish_reason]
        entries = self._calls.setdefault(index, ToolCallStream()).finish(complete=reason == "stop")
        summary = speculative_summary([result.stats])
        return self._call_chunk(index, entries, "tool_calls" if reason == "stop" else reason, speculative=summary)

    def _call_chunk(
        self, index: int, entries: list[dict[str, Any]], finish_reason: str | None, **extra: Any
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": {"tool_calls": entries} if entries else {}, "logprobs": None}
        return self._chunk([{**choice, "finish_reason": finish_reason}], **extra)


class ParsedToolCallFormat(ChatFormat):
    """Chat answers under tool_choice "auto" with `--tool-call-parser hermes`: the model writes freely; a whole
    choice whose text holds valid calls (`parse_hermes`) answers with `tool_calls`, the text before them as content,
    and finish reason "tool_calls". Streamed, text is sent as it comes except what could be a call's start
    (`HermesStream` holds it back); at the end come the calls, one entry each with the whole arguments, then finish
    reason "tool_calls" — or, when no call materialised, the held text as content."""

    def __init__(self, *args: Any, tool_names: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_names = list(tool_names)
        self._streams: dict[int, HermesStream] = {}

    def _stream(self, index: int) -> HermesStream:
        return self._streams.setdefault(index, HermesStream(self.tool_names))

    def choice(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None, whole: bool = False
    ) -> dict[str, Any]:
        choice = super().choice(index, text, finish_reason, logprobs, whole)
        if not whole or (parsed := parse_hermes(text, self.tool_names)) is None:
            return choice
        content, calls = parsed
        message = {"role": "assistant", "content": content, "tool_calls": calls}
        return {**choice, "message": message, "finish_reason": "tool_calls"}

    def delta_chunk(self, index: int, delta: Delta) -> dict[str, Any] | None:
        return super().delta_chunk(index, Delta(delta.token_ids, self._stream(index).feed(delta.text), delta.logprobs))

    def final_chunks(self, index: int, result: GenerationResult) -> list[dict[str, Any]]:
        rest, calls = self._stream(index).finish()
        summary = speculative_summary([result.stats])
        if not calls:
            chunks = [self._chunk([self.choice(index, rest, None, None)])] if rest else []
            return [*chunks, self.final_chunk(index, result)]
        entries = {"index": index, "delta": {"tool_calls": stream_entries(calls)}, "logprobs": None}
        finish = {"index": index, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
        return [self._chunk([{**entries, "finish_reason": None}]), self._chunk([finish], speculative=summary)]


def server_sent_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def event_stream(generations: Generations, form: ResponseFormat) -> AsyncIterator[str]:
    """The SSE body of a streamed answer. Leaving early (the client went away) cancels the generations."""
    finished = False
    results: dict[int, GenerationResult] = {}
    try:
        for chunk in form.opening_chunks():
            yield server_sent_event(chunk)
        try:
            async for index, event in generations.events():
                if isinstance(event, GenerationResult):
                    results[index] = event
                    for chunk in form.final_chunks(index, event):
                        yield server_sent_event(chunk)
                elif (chunk := form.delta_chunk(index, event)) is not None:
                    yield server_sent_event(chunk)
            if form.include_usage:
                ordered = [results[index] for index in range(len(results))]
                yield server_sent_event(form.usage_chunk(generations, ordered))
        except APIError as error:
            yield server_sent_event(error.body())
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            generations.cancel()


async def client_disconnected(request: Request) -> None:
    """Return once the client has gone away (the body is already read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def results_unless_disconnected(generations: Generations, request: Request) -> list[GenerationResult] | None:
    """The finished generations, or None when the client left first (the generations are then cancelled)."""
    waiting = asyncio.ensure_future(generations.results())
    watching = asyncio.ensure_future(client_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not waiting.done():
            waiting.cancel()
            generations.cancel()
    return waiting.result() if waiting in done else None


class BodySizeLimit:
    """ASGI middleware answering 413 for bodies over `limit` bytes: at once when Content-Length says so, else as
    soon as the bytes read pass it (a chunked upload). Starlette's own limiter answers in plain text, and every
    error here must be an OpenAI error object."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"the request body is larger than this server's limit of {self.limit} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await APIError(413, self._too_large().detail, code="request_too_large").response()(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._too_large()
            return message

        await self.app(scope, counting_receive, send)


class BodyReadTimeout:
    """ASGI middleware answering 408 when a request's body has not fully arrived `timeout` seconds after the request
    began: a client that sends its headers and then trickles the body, or never sends it, would otherwise hold a
    connection and a handler as long as it liked. Once the body is in, waiting (for a disconnect) has no limit."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body_complete = False

        async def timed_receive() -> Message:
            nonlocal body_complete
            if body_complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError as error:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} seconds") from error
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class BearerAuth:
    """ASGI middleware requiring OpenAI's `Authorization: Bearer <key>` header on every path but `open_paths`; a
    missing or wrong key gets 401 with an OpenAI error object. The key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(f"Bearer {key.strip()}".encode(), self.expected):
            await self.app(scope, receive, send)
            return
        message = "a wrong API key was given" if given else "no API key was given: send 'Authorization: Bearer KEY'"
        error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


# A Host header: a name or IPv4 address, or a bracketed IPv6 address, then an optional port.
HOST_HEADER = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[^\[\]:/@\s]+)(?::[0-9]*)?")


def host_name(host: str) -> str:
    """A host as the allowed-hosts list compares it: lower case, without an IPv6 address's brackets or a fully
    qualified name's final dot."""
    return host.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")


class HostCheck:
    """ASGI middleware answering 400 to a request whose Host header names none of `allowed_hosts` (any port): a web
    page that rebinds its own DNS name to this machine's address makes the browser send its own name as the Host, so
    a server on the loopback address never answers it. An entry `*.example.com` allows every subdomain of
    example.com. Starlette's TrustedHostMiddleware answers in plain text, and every error here must be an OpenAI
    error object."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = list(allowed_hosts)
        names = [host_name(host) for host in allowed_hosts]
        self.names = frozenset(name for name in names if not name.startswith("*."))
        self.suffixes = tuple(name[1:] for name in names if name.startswith("*."))

    def allows(self, header: str | None) -> bool:
        match = HOST_HEADER.fullmatch(header) if header is not None else None
        if match is None:
            return False
        name = host_name(match["name"])
        return name in self.names or name.endswith(self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = Headers(scope=scope).get("host") if scope["type"] == "http" else None
        if scope["type"] != "http" or self.allows(header):
            await self.app(scope, receive, send)
            return
        given = "no Host header was sent" if header is None else f"the Host header {echo(header)} is not allowed"
        message = f"{given}: this server answers to {', '.join(self.allowed_hosts)} (any port; see --allowed-hosts)"
        await APIError(400, message, param="Host", code="invalid_host").response()(scope, receive, send)


class RequestCounter:
    """ASGI middleware counting answered requests by endpoint and status code (every status, 413 and 500 too)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        if path.startswith(MODEL_PATH_PREFIX):
            endpoint = MODEL_PATH_PREFIX + "{model}"
        status = 500

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()


def create_app(
    decoder: SpeculativeDecoder,
    *,
    gamma: int | None = None,
    model_name: str | None = None,
    max_queue: int = 256,
    max_body_bytes: int = 1 << 20,
    shutdown_timeout: float = 30.0,
    cors_origins: Sequence[str] = (),
    request_timeout: float = 10.0,
    api_key: str | None = None,
    api_key_everywhere: bool = False,
    docs: bool = False,
    allowed_hosts: Sequence[str] | None = None,
    chat_template: str | None = None,
    tool_call_parser: str | None = None,
) -> FastAPI:
    """An app serving `decoder` under `model_name` (default: the target's name or path). Requests run as a
    continuous batch of up to the decoder's `max_batch_size` rows, drafting `gamma` tokens per step (None: the
    engine's load-aware choice each step). At most `max_queue` generations wait for a slot (then 503 with
    Retry-After); bodies over `max_body_bytes` get 413. On shutdown the running generations get `shutdown_timeout`
    seconds to end. `cors_origins` lets browser pages from those origins (or "*" for any) call the API; by default
    browsers get no CORS headers. A body not fully received `request_timeout` seconds after the request began gets
    408. With `api_key`, every endpoint but /health and /metrics (those too with `api_key_everywhere`) needs
    `Authorization: Bearer <api_key>` (an empty or whitespace-padded key is refused). `docs` turns on /docs, /redoc
    and /openapi.json (off: they describe the endpoints' Python signatures, not the OpenAI API, and are one more page
    to protect). `allowed_hosts` lists the host names a request's Host header may give (any port; `*.example.com` for
    subdomains, "*" for any); others get 400. None (the default here; `speculor serve` defaults to the loopback names
    on a loopback address) checks nothing. `chat_template` (Jinja text, as vLLM's --chat-template takes it)
    replaces the tokenizer's own for chat completions; one that cannot render a conversation is refused here.
    `tool_call_parser` ("hermes", as vLLM's --tool-call-parser with --enable-auto-tool-choice) answers chat requests
    whose tools leave tool_choice "auto" by reading the calls from the model's text; None refuses "auto"."""
    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise SpeculorError(f"unknown tool call parser {tool_call_parser!r}: use one of {', '.join(PARSERS)}")
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        # An empty key must not mean "no key", nor a padded one a key no client can send (clients' keys are stripped).
        raise SpeculorError("api_key must be a non-empty string without whitespace around it (None: no key)")
    served = ServedModel(decoder, model_name or decoder.target.name, gamma, chat_template, tool_call_parser)
    metrics = ServerMetrics()
    worker = GenerationWorker(decoder.new_engine(), metrics, max_queue)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await run_in_threadpool(worker.close, shutdown_timeout)

    app = FastAPI(
        title="speculor",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.served = served
    app.state.metrics = metrics
    app.state.worker = worker
    install_error_handlers(app)
    # The last middleware added runs first: count every answer, check the Host, let CORS answer preflights, check
    # the key, and only then read (and time and measure) the body.
    app.add_middleware(BodySizeLimit, limit=max_body_bytes)
    app.add_middleware(BodyReadTimeout, timeout=request_timeout)
    if api_key:
        app.add_middleware(
            BearerAuth, api_key=api_key, open_paths=frozenset() if api_key_everywhere else MONITORING_PATHS
        )
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])
    if allowed_hosts is not None and "*" not in allowed_hosts:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)
    app.add_middleware(RequestCounter, metrics=metrics)

    async def answer(
        request: Request, body: SamplingRequest, requests: list[tuple[DecodeRequest, int]], form: ResponseFormat
    ) -> Response:
        generations = Generations(requests, request.state.arrived)
        worker.submit(generations)
        if body.stream:
            return StreamingResponse(
                event_stream(generations, form), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        results = await results_unless_disconnected(generations, request)
        if results is None:
            return APIError(499, "the client closed the request", code="client_closed_request").response()
        return JSONResponse(form.response(generations, results))

    def response_format(
        shape: type[ResponseFormat],
        body: SamplingRequest,
        requests: list[tuple[DecodeRequest, int]],
        echoed: Sequence[str] = (),
        **options: Any,
    ) -> ResponseFormat:
        return shape(
            served.name,
            served.token_text,
            token_bytes=served.token_bytes,
            prompt_tokens=sum(tokens for _, tokens in requests),
            include_usage=body.include_usage,
            continuous_usage=body.continuous_usage,
            with_logprobs=body.logprob_alternatives is not None,
            choices=len(requests),
            echoed=echoed,
            **options,
        )

    async def read_body(request: Request, schema: type[Body]) -> Body:
        request.state.arrived = time.perf_counter()
        body = parse_body(schema, await request.body())
        served.check_model(body.model)
        return body

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_body(request, CompletionRequest)
        worker.check_fits(len(body.prompts) * body.n)
        requests = await run_in_threadpool(served.completion, body)
        echoed = served.echoed(body) if body.echo else ()
        return await answer(request, body, requests, response_format(CompletionFormat, body, requests, echoed))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, ChatCompletionRequest)
        worker.check_fits(body.n, "n")
        requests = await run_in_threadpool(served.chat, body)
        extra = body.model_extra or {}
        if parses_tool_calls(extra, tool_call_parser):
            form = response_format(ParsedToolCallFormat, body, requests, tool_names=tool_names(extra))
        else:
            form = response_format(ToolCallFormat if forces_tool_call(extra) else ChatFormat, body, requests)
        return await answer(request, body, requests, form)

    def model_card() -> dict[str, Any]:
        return {
            "id": served.name,
            "object": "model",
            "created": started,
            "owned_by": "speculor",
            "max_model_len": served.context_length,
        }

    def get_and_head(path: str) -> Callable[[Callable], Callable]:
        """Route GET and HEAD (which clients and probes use to check a URL) to `path`; HEAD stays out of the OpenAPI
        schema, where it would repeat the GET operation."""

        def register(endpoint: Callable) -> Callable:
            app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
            return app.get(path)(endpoint)

        return register

    @get_and_head("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @get_and_head("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        served.check_model(model)
        return model_card()

    @get_and_head("/health")
    async def health() -> JSONResponse:
        draft = display_name(decoder.draft.name) if decoder.draft is not None else None
        body = {
            "status": "shutting down" if worker.closing else "ok",
            "model": served.name,
            "draft": draft,
            "ngram": decoder.ngram,
            "gamma": gamma if gamma is not None else "auto",
            "max_batch_size": decoder.max_batch_size,
            "running": worker.running,
            "waiting": worker.waiting,
        }
        return JSONResponse(body, status_code=503 if worker.closing else 200)

    @get_and_head("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
