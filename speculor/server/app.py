"""The FastAPI app: OpenAI's completions and chat completions endpoints over a `SpeculativeDecoder`.

Request flow: FastAPI parses and checks the body against `schemas` (422 on a bad shape); the handler checks what
needs the model (name, prompt length, chat template; 400/404) on a thread pool, builds a `Decoding` — whose own
`SpeculorError` checks run before anything is generated — and queues it on the `GenerationWorker`. The answer is
one JSON object, or with `stream: true` server-sent events in OpenAI's chunk format ending with `data: [DONE]`.

Every answer carries `usage` and a `speculative` object (drafted, accepted, acceptance_rate,
mean_accepted_length). A stream always ends with one extra chunk holding them and an empty `choices` list — the
chunk OpenAI sends for `stream_options: {"include_usage": true}` — whether or not the client asked for it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from speculor import __version__
from speculor.api import SpeculativeDecoder
from speculor.engine import Decoding, GenerationResult, GenerationStats
from speculor.errors import SpeculorError
from speculor.server.errors import APIError, install_error_handlers
from speculor.server.metrics import ServerMetrics
from speculor.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from speculor.server.worker import FINISH_REASONS, GenerationWorker, Job

# OpenAI's default for /v1/completions when max_tokens is left out (chat defaults to the rest of the context).
DEFAULT_COMPLETION_TOKENS = 16

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ServedModel:
    """The decoder behind the endpoints: checks a request against the model and turns it into a `Decoding`."""

    def __init__(self, decoder: SpeculativeDecoder, name: str, gamma: int) -> None:
        self.decoder = decoder
        self.name = name
        self.gamma = gamma
        runners = [decoder.target_runner, decoder.draft_runner]
        self.context_length = min(runner.max_length for runner in runners if runner is not None)

    def check(self, body: SamplingRequest) -> None:
        """Refuse what no prompt can fix: another model's name, several choices, unimplemented options."""
        if body.model != self.name:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server has {self.name!r}",
                param="model",
                code="model_not_found",
            )
        if body.n != 1:
            raise APIError(
                400, "n > 1 is not supported: send one request per completion", param="n", code="unsupported_parameter"
            )
        unsupported = body.unsupported_options()
        if unsupported:
            raise APIError(
                400,
                f"{unsupported[0]!r} is not supported by this server",
                param=unsupported[0],
                code="unsupported_parameter",
            )

    def completion(self, body: CompletionRequest) -> tuple[Decoding, int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > 1:
                raise APIError(
                    400,
                    "batched prompts are not supported: send one prompt per request",
                    param="prompt",
                    code="unsupported_parameter",
                )
            prompt = prompt[0]
        try:
            prompt_ids = self.decoder.encode(prompt)
        except SpeculorError as error:
            raise APIError(400, str(error), param="prompt", code="invalid_prompt") from error
        return self._decoding(body, prompt_ids, "prompt", body.max_tokens, DEFAULT_COMPLETION_TOKENS)

    def chat(self, body: ChatCompletionRequest) -> tuple[Decoding, int]:
        tokenizer = self.decoder.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(
                400,
                f"model {self.name!r} has no chat template, so it cannot answer chat completions; use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        messages = [{"role": message.role, "content": message.text()} for message in body.messages]
        try:
            prompt_ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except (TemplateError, ValueError) as error:
            raise APIError(
                400, f"the chat template rejected these messages: {error}", param="messages", code="invalid_messages"
            ) from error
        max_tokens = body.max_completion_tokens or body.max_tokens
        return self._decoding(body, list(prompt_ids), "messages", max_tokens, None)

    def _decoding(
        self,
        body: SamplingRequest,
        prompt_ids: list[int],
        prompt_param: str,
        max_tokens: int | None,
        default_tokens: int | None,
    ) -> tuple[Decoding, int]:
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise APIError(
                400,
                f"the prompt is {len(prompt_ids)} tokens long and this model's context length is "
                f"{self.context_length} tokens, which leaves no room to generate: shorten the prompt",
                param=prompt_param,
                code="context_length_exceeded",
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
        try:
            decoding = self.decoder.decoding(
                prompt_ids,
                max_new_tokens=max_tokens,
                gamma=self.gamma,
                temperature=body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=body.seed,
                stop=body.stop,
                ignore_eos=body.ignore_eos,
            )
        except SpeculorError as error:
            raise APIError(400, str(error), code="invalid_value") from error
        return decoding, len(prompt_ids)


def speculative_summary(stats: GenerationStats) -> dict[str, Any]:
    return {
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": stats.acceptance_rate,
        "mean_accepted_length": stats.mean_accepted_length,
    }


def usage(result: GenerationResult, prompt_tokens: int) -> dict[str, int]:
    completion_tokens = len(result.token_ids)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseFormat:
    """The OpenAI envelope shared by both endpoints; subclasses shape the choices."""

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, model: str) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def response(self, result: GenerationResult, prompt_tokens: int) -> dict[str, Any]:
        return self._envelope(
            self.object_name,
            [self.whole_choice(result.text or "", FINISH_REASONS[result.finish_reason])],
            usage=usage(result, prompt_tokens),
            speculative=speculative_summary(result.stats),
        )

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return self._envelope(self.chunk_object_name, [self.delta_choice(text, finish_reason)])

    def usage_chunk(self, result: GenerationResult, prompt_tokens: int) -> dict[str, Any]:
        return self._envelope(
            self.chunk_object_name,
            [],
            usage=usage(result, prompt_tokens),
            speculative=speculative_summary(result.stats),
        )

    def whole_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormat(ResponseFormat):
    id_prefix = "cmpl"
    object_name = chunk_object_name = "text_completion"

    def whole_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return self.whole_choice(text, finish_reason)


class ChatFormat(ResponseFormat):
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def whole_choice(self, text: str, finish_reason: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def opening_chunks(self) -> list[dict[str, Any]]:
        opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return [self._envelope(self.chunk_object_name, [opening])]

    def delta_choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def server_sent_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def event_stream(job: Job, form: ResponseFormat) -> AsyncIterator[str]:
    """The SSE body of a streamed answer. Leaving early (the client went away) cancels the generation."""
    finished = False
    try:
        for chunk in form.opening_chunks():
            yield server_sent_event(chunk)
        while True:
            try:
                event = await job.next_event()
            except APIError as error:
                yield server_sent_event(error.body())
                break
            if isinstance(event, GenerationResult):
                yield server_sent_event(form.chunk("", FINISH_REASONS[event.finish_reason]))
                yield server_sent_event(form.usage_chunk(event, job.prompt_tokens))
                break
            if event.text:
                yield server_sent_event(form.chunk(event.text))
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            job.cancel()


async def client_disconnected(request: Request) -> None:
    """Return once the client has gone away (the body is already read, so only a disconnect can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_unless_disconnected(job: Job, request: Request) -> GenerationResult | None:
    """The finished generation, or None when the client left first (the generation is then cancelled)."""
    waiting = asyncio.ensure_future(job.result())
    watching = asyncio.ensure_future(client_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not waiting.done():
            waiting.cancel()
            job.cancel()
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


class RequestCounter:
    """ASGI middleware counting answered requests by endpoint and status code (every status, 413 and 500 too)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
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
    gamma: int = 4,
    model_name: str | None = None,
    max_waiting: int = 256,
    max_body_bytes: int = 1 << 20,
    shutdown_timeout: float = 30.0,
) -> FastAPI:
    """An app serving `decoder` under `model_name` (default: the target's name or path), drafting `gamma` tokens
    per step. At most `max_waiting` requests queue (then 503); bodies over `max_body_bytes` get 413. On shutdown
    the running generation gets `shutdown_timeout` seconds to end."""
    served = ServedModel(decoder, model_name or decoder.target.name, gamma)
    metrics = ServerMetrics()
    worker = GenerationWorker(metrics, max_waiting)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        await run_in_threadpool(worker.close, shutdown_timeout)

    app = FastAPI(title="speculor", version=__version__, lifespan=lifespan)
    app.state.served = served
    app.state.metrics = metrics
    app.state.worker = worker
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)

    async def answer(request: Request, body: SamplingRequest, job: Job, form: ResponseFormat) -> Response:
        worker.submit(job)
        if body.stream:
            return StreamingResponse(
                event_stream(job, form), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        result = await result_unless_disconnected(job, request)
        if result is None:
            return APIError(499, "the client closed the request", code="client_closed_request").response()
        return JSONResponse(form.response(result, job.prompt_tokens))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrived = time.perf_counter()
        served.check(body)
        decoding, prompt_tokens = await run_in_threadpool(served.completion, body)
        return await answer(request, body, Job(decoding, prompt_tokens, arrived), CompletionFormat(served.name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrived = time.perf_counter()
        served.check(body)
        decoding, prompt_tokens = await run_in_threadpool(served.chat, body)
        return await answer(request, body, Job(decoding, prompt_tokens, arrived), ChatFormat(served.name))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {
            "id": served.name,
            "object": "model",
            "created": started,
            "owned_by": "speculor",
            "max_model_len": served.context_length,
        }
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> JSONResponse:
        draft = decoder.draft.name if decoder.draft is not None else None
        body = {
            "status": "shutting down" if worker.closing else "ok",
            "model": served.name,
            "draft": draft,
            "ngram": decoder.ngram,
            "gamma": gamma,
            "waiting": worker.waiting,
        }
        return JSONResponse(body, status_code=503 if worker.closing else 200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
