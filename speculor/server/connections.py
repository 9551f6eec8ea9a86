"""Bounds on connections that uvicorn does not set: how many may be open, and how long a request's headers may take.

uvicorn accepts every connection and waits for a request's headers as long as the client likes: its
`limit_concurrency` is only checked once a request's headers have arrived (a connection that sends nothing, or
trickles header lines, is never counted against it), it answers in plain text, and its keep-alive timeout starts
only after a first response. `guarded_protocol` makes a subclass of uvicorn's h11 protocol that
  - answers a connection past `max_connections` open ones with a 503 (an OpenAI error object, Retry-After, then
    Connection: close) as soon as it opens, and closes it, reading and dropping what the client still sends for a
    moment first so the answer is not lost to a reset;
  - closes a connection whose request headers have not all arrived `header_timeout` seconds after the request's first
    byte (for a connection's first request: after the connection opened), with a 408 when part of them came, and
    silently when nothing came.
The h11 protocol (pure Python, always installed with uvicorn) is used whatever else is installed, so these bounds
hold the same everywhere; h11 also caps a request's headers at 16 KiB (then 400).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from speculor.server.errors import APIError
from speculor.server.worker import RETRY_AFTER_SECONDS

logger = logging.getLogger(__name__)

# Seconds a refused connection is kept reading (and dropping) what its client sends after the 503, so that closing
# it does not reset the connection before the client has read the answer.
REFUSED_LINGER_SECONDS = 1.0

# At most one log line per this many seconds about refused connections (a flood must not flood the log too).
REFUSAL_LOG_INTERVAL = 10.0


def raw_response(error: APIError, headers: dict[str, str] | None = None) -> bytes:
    """`error` as the bytes of a whole HTTP/1.1 response that closes the connection, for writing outside h11's state
    machine (no request has been parsed to answer)."""
    body = json.dumps(error.body()).encode()
    fields = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        **(headers or {}),
    }
    head = f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return head.encode("latin-1") + b"\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection limit and a header timeout (see the module's docstring); the bounds
    are class attributes, set by `guarded_protocol`."""

    max_connections: int = 1024
    header_timeout: float = 10.0
    _last_refusal_log = float("-inf")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_timer()  # this request's headers are in
        elif self._timer is None and self.conn.trailing_data[0]:
            # The first bytes of a next request on a kept-alive connection: its headers get the same time.
            self._timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._refused:
            return
        super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            message = f"the request's headers did not all arrive within {self.header_timeout:g} seconds"
            self.transport.write(raw_response(APIError(408, message, code="request_timeout")))
        self.transport.close()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        message = (
            f"the server has {self.max_connections} connections open, its limit (--max-connections); "
            "retry after a moment"
        )
        error = APIError(503, message, code="too_many_connections")
        transport.write(raw_response(error, {"retry-after": str(RETRY_AFTER_SECONDS)}))
        if transport.can_write_eof():
            transport.write_eof()
            self._timer = self.loop.call_later(REFUSED_LINGER_SECONDS, transport.close)
        else:
            transport.close()
        now = time.monotonic()
        if now - GuardedH11Protocol._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            GuardedH11Protocol._last_refusal_log = now
            logger.warning(
                "refusing connections: %d are open, the --max-connections limit (this line repeats at most every %g s)",
                self.max_connections,
                REFUSAL_LOG_INTERVAL,
            )


def guarded_protocol(max_connections: int, header_timeout: float) -> type[GuardedH11Protocol]:
    """A `GuardedH11Protocol` subclass with these bounds, to pass to uvicorn as `Config(http=...)`."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"max_connections": max_connections, "header_timeout": header_timeout},
    )
