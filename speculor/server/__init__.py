"""`speculor serve`: an OpenAI-compatible HTTP server with speculative decoding, Prometheus metrics and strict
input checking. `create_app(decoder)` builds the app in-process; `command` adds the CLI subcommand.

The web stack (FastAPI, uvicorn, prometheus_client) is imported only when `create_app` is first used, so the
command line — which imports `speculor.server.command` to list its subcommands — still works where those
packages are not installed (only `speculor serve` itself needs them).
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from speculor.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
