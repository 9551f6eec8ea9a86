"""OpenAI-style error responses: every failure answers `{"error": {"message", "type", "param", "code"}}`.

Status codes: 400 for every invalid request (unparseable JSON, a missing field, a wrong type, a value out of range, a
prompt past the context, an unsupported option, no chat template, a Host header not allowed) — one status, as OpenAI
answers, so the SDKs raise their one `BadRequestError` — 401 for a missing or wrong API key, 404 for an unknown model
or path, 408 for headers or a body that arrive too slowly, 413 for an oversized body, 503 while overloaded (the
waiting queue, or the connections, full) or shutting down, 500 for a failure inside generation (of that request
only).

Every message is bounded: a value the client sent (a model name, a parameter name, a Host header) is quoted through
`echo`, which keeps its first `ECHO_LIMIT` characters and says how long it was, and no message or `param` is ever
longer than `MAX_MESSAGE` or `ECHO_LIMIT` characters, whatever else it quotes (a chat template's exception, a
tokenizer's complaint).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}

# Characters of a client's value an error message quotes, and the most characters any message holds.
ECHO_LIMIT = 100
MAX_MESSAGE = 1000


def echo(value: str, limit: int = ECHO_LIMIT) -> str:
    """`value` quoted for an error message: whole when at most `limit` characters long, else its first `limit`
    characters, an ellipsis and its length, so an error never grows with what the client sent."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the cut marked with an ellipsis and the original length."""
    if len(text) <= limit:
        return text
    note = f"… ({len(text)} characters)"
    return text[: max(0, limit - len(note))] + note


class APIError(Exception):
    """An error to answer with `status` and an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message = bounded(message, MAX_MESSAGE)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else bounded(param, ECHO_LIMIT)
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# Names pydantic puts in an error's location to say which member of a union failed; they are not fields.
UNION_MEMBER_NAMES = {"str", "int", "float", "bool", "list", "dict"}


def _field_path(location: Sequence[str | int]) -> str:
    """`("body", "messages", 0, "role")` → `messages[0].role`; pydantic's union-member names are left out."""
    path = ""
    for part in location[1:] if location and location[0] == "body" else location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in UNION_MEMBER_NAMES and not any(mark in part for mark in "[]-"):
            path += f".{part}" if path else part
    return path


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """One clear message out of pydantic's list: the first field that failed and every reason it failed."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "malformed JSON")
        return APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    param = _field_path(first.get("loc", ()))
    reasons = list(dict.fromkeys(e["msg"] for e in errors if _field_path(e.get("loc", ())) == param))
    if first.get("type") == "missing":
        return APIError(400, f"missing required field {echo(param)}", param=param, code="missing_required_parameter")
    if not param:
        return APIError(400, f"the request body must be a JSON object: {'; '.join(reasons)}", code="invalid_body")
    return APIError(400, f"invalid {echo(param)}: {'; or '.join(reasons)}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Turn every error FastAPI or Starlette raises into the OpenAI shape, so clients parse one format."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        message = "no such path" if error.status_code == 404 else str(error.detail)
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large"}.get(
            error.status_code
        )
        response = APIError(error.status_code, message, code=code).response()
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=error)
        return APIError(500, f"internal error: {type(error).__name__}", code="internal_error").response()
