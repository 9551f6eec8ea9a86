"""`speculor serve`: an OpenAI-compatible HTTP server with speculative decoding, Prometheus metrics and strict
input checking. `create_app(decoder)` builds the app in-process; `register` adds the CLI subcommand."""

from speculor.server.app import create_app
from speculor.server.command import register

__all__ = ["create_app", "register"]
