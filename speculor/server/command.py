"""The `speculor serve` subcommand: take the port, load a model pair, build the app, run it under uvicorn.

The port is bound before the models load (several seconds): a port already in use then fails at once with one
`error:` line, instead of after a loading run that ends in "serving on …" followed by uvicorn's bind error.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

from speculor.cli import DEFAULT_BATCH_SIZE, add_model_arguments, apply_config_file, console, quiet_rank
from speculor.errors import SpeculorError

# The model id clients send to the shipped family (its directory path would be an awkward name).
SHIPPED_MODEL_NAME = "speculor-shipped"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible API (completions, chat, metrics) with speculative decoding",
        description="Without --target, serves the shipped model family with its best draft.",
    )
    add_model_arguments(parser, target_required=False)
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument(
        "--gamma",
        type=int,
        help="tokens drafted per step for every request (default: chosen each step from the batch's load)",
    )
    drafting.add_argument("--config", help="best_config.json written by `speculor bench` (draft and gamma)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local connections only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--model-name",
        help=f"model id clients send (default: the target's name or path; {SHIPPED_MODEL_NAME} for the shipped pair)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"requests generating together in one batch (KV-cache slots; default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-queue",
        "--max-waiting",
        type=int,
        default=256,
        help="requests waiting for a batch slot beyond which new ones get 503 with Retry-After",
    )
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="let browser pages from this origin call the API (repeatable; * for any); off by default",
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on shutdown"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send the whole request body before getting 408 (default 10)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("SPECULOR_API_KEY"),
        help="require 'Authorization: Bearer KEY' (as OpenAI clients send it) on the API; default: $SPECULOR_API_KEY",
    )
    parser.add_argument(
        "--api-key-all",
        action="store_true",
        help="require the API key on /health and /metrics too (by default they stay open for probes and scrapers)",
    )
    parser.add_argument("--docs", action="store_true", help="serve the /docs, /redoc and /openapi.json pages")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(handler=run_serve)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for uvicorn to serve on; a `SpeculorError` when that address cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise SpeculorError(f"cannot listen on {host}:{port}: {error.strerror or error}") from error


def progress(message: str) -> None:
    console.print(f"[dim]{message}[/dim]", soft_wrap=True)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 (checked here, used by load_and_serve)

        from speculor.server.app import create_app  # noqa: F401
    except ImportError as error:
        raise SpeculorError(
            f"`speculor serve` needs fastapi, uvicorn, pydantic and prometheus_client installed ({error})"
        ) from error

    from speculor.server import replicas

    apply_config_file(args)
    if args.api_key_all and not args.api_key:
        raise SpeculorError("--api-key-all needs an API key (--api-key or $SPECULOR_API_KEY)")
    if args.tensor_parallel > 1 and replicas.serving_rank() > 0:
        # A follower rank: no port, nothing printed; it replays rank 0's engine (speculor.server.replicas).
        quiet_rank()
        return load_and_serve(args, None)
    with listening_socket(args.host, args.port) as sock, replicas.spawned_followers(args.tensor_parallel):
        return load_and_serve(args, sock)


def load_and_serve(args: argparse.Namespace, sock: socket.socket | None) -> int:
    """Load the models, warm them up and serve on the already bound `sock` until uvicorn stops; a follower
    tensor-parallel rank (no `sock`) replays rank 0's engine instead."""
    import uvicorn

    from speculor.api import SpeculativeDecoder
    from speculor.server import replicas
    from speculor.server.app import create_app
    from speculor.threads import use_cpu_threads

    use_cpu_threads(args.threads, args.device)  # --threads comes with add_model_arguments
    if args.config:
        # A best_config.json names the target it was measured on (its draft only makes sense with that target) and
        # the γ that paid best there, which beats the load-aware default when no --gamma is given.
        config = json.loads(Path(args.config).read_text())
        args.target = args.target or config.get("target")
        args.gamma = args.gamma or config.get("gamma")
    if args.target is None:
        from speculor.models import shipped

        family = shipped()
        args.target = family.target
        args.model_name = args.model_name or SHIPPED_MODEL_NAME
        if args.draft is None and args.ngram is None:
            args.draft = family.best_draft
    drafting = args.draft or (f"prompt lookup, n-grams up to {args.ngram}" if args.ngram else "none")
    progress(f"loading target {args.target} (draft: {drafting}) …")
    decoder = SpeculativeDecoder(
        args.target,
        args.draft,
        ngram=args.ngram,
        device=args.device,
        dtype=args.dtype,
        runner=args.runner,
        kernels=args.kernels,
        max_batch_size=args.max_batch_size,
        tensor_parallel=args.tensor_parallel,
    )
    progress("warming up: running each step shape once …")
    decoder.warm_up(args.gamma)
    if sock is None:
        return replicas.follow(decoder)
    app = create_app(
        decoder,
        gamma=args.gamma,
        model_name=args.model_name,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout,
        cors_origins=args.cors_origin,
        request_timeout=args.request_timeout,
        api_key=args.api_key,
        api_key_everywhere=args.api_key_all,
        docs=args.docs,
    )
    console.print(
        f"serving {app.state.served.name!r} on http://{args.host}:{sock.getsockname()[1]}/v1 (draft: {drafting})",
        soft_wrap=True,
    )
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    lost: list[SpeculorError] = []
    if decoder.tensor_parallel is not None:

        def stop_serving(error: SpeculorError) -> None:
            lost.append(error)
            server.should_exit = True

        replicas.lead(app.state.worker, decoder, stop_serving)
    server.run(sockets=[sock])
    if lost:
        raise lost[0]
    return 0
