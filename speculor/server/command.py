"""The `speculor serve` subcommand: check the settings, take the port, load a model pair, build the app, run it
under uvicorn.

Every setting is checked before anything else happens: one that cannot work (an empty API key, a timeout that is not
a positive finite number, a size below its minimum, a malformed host list) stops the command with one `error:` line
naming the option. The port is bound before the models load (several seconds): a port already in use then fails at
once with one `error:` line, instead of after a loading run that ends in "serving on …" followed by uvicorn's bind
error.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import socket
from pathlib import Path

from speculor.cli import (
    DEFAULT_BATCH_SIZE,
    add_model_arguments,
    apply_config_file,
    config_choice,
    console,
    quiet_rank,
)
from speculor.errors import SpeculorError

# The model id clients send to the shipped family (its directory path would be an awkward name).
SHIPPED_MODEL_NAME = "speculor-shipped"

API_KEY_VARIABLE = "SPECULOR_API_KEY"

# Connections open at once beyond which new ones get 503 (above the default slots plus queue, 8 + 256, so that a
# full queue, not the connection limit, is what a burst of single requests meets first).
DEFAULT_MAX_CONNECTIONS = 512

# The Host names a server bound to a loopback address answers to by default (with any port).
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

# A host name or IPv4 address as --allowed-hosts takes it (IPv6 addresses are checked by `ipaddress`).
HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")

# File descriptors the process needs beside its connections (models, logs, threads' pipes).
SPARE_FILE_DESCRIPTORS = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible API (completions, chat, metrics) with speculative decoding",
        description="Without --target, serves the shipped model family with its best draft.",
    )
    add_model_arguments(parser, target_required=False)
    parser.add_argument(
        "--gamma",
        type=int,
        help="tokens drafted per step for every request (default: the --config file's, else chosen each step from "
        "the batch's load); wins over the --config file's",
    )
    parser.add_argument(
        "--config",
        help="best_config.json written by `speculor bench`: its target (unless --target is given), and the draft and "
        "γ it chose for greedy decoding (unless --draft/--ngram or --gamma are given)",
    )
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
        help="requests waiting for a batch slot beyond which new ones get 503 with Retry-After (0: none wait)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="connections open at once beyond which new ones get 503 and are closed "
        f"(default {DEFAULT_MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a request's headers may take to arrive, from its first byte (a new connection's first request: "
        "from the connection); then 408 and the connection closes (default 10)",
    )
    parser.add_argument(
        "--allowed-hosts",
        help="comma-separated host names or addresses a request's Host header may give (any port; *.example.com for "
        "subdomains; * for any), others get 400; default: localhost, 127.0.0.1 and ::1 when bound to a loopback "
        "address, any host otherwise",
    )
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
        help="require 'Authorization: Bearer KEY' (as OpenAI clients send it) on the API; default: "
        f"${API_KEY_VARIABLE}. Whitespace around the key is stripped; an empty key is refused",
    )
    parser.add_argument(
        "--api-key-all",
        action="store_true",
        help="require the API key on /health and /metrics too (by default they stay open for probes and scrapers)",
    )
    parser.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template for /v1/chat/completions, in place of the tokenizer's own (as vLLM's flag; the "
        "shipped family has one)",
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=["hermes"],
        help="answer chat requests whose tools leave tool_choice 'auto' (the default) by generating freely, the tools "
        "given to the chat template, and reading the model's <tool_call> blocks as tool_calls (as vLLM's "
        "--enable-auto-tool-choice --tool-call-parser hermes; Hermes 2 Pro, Qwen 2.5, Qwen 3); without it 'auto' is "
        "refused",
    )
    parser.add_argument("--docs", action="store_true", help="serve the /docs, /redoc and /openapi.json pages")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(handler=run_serve)


def positive_number(option: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise SpeculorError(f"{option} must be a positive finite number of seconds, got {value!r}")


def at_least(option: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise SpeculorError(f"{option} must be at least {minimum}, got {value}")


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """The API key from --api-key, else from $SPECULOR_API_KEY, without surrounding whitespace (which no client can
    send: clients' keys are stripped too), or None for none. An empty key — `--api-key ''`, or the variable set to
    nothing, as a script's unset `$KEY` leaves it — is refused rather than taken to mean "no key", and so is a key
    with characters an HTTP header cannot carry. Error messages never show the key."""
    key, source = args.api_key, "--api-key"
    if key is None:
        key, source = os.environ.get(API_KEY_VARIABLE), f"${API_KEY_VARIABLE}"
    if key is None:
        return None
    stripped = key.strip()
    if not stripped:
        raise SpeculorError(
            f"{source} is {'only whitespace' if key else 'empty'}, which would leave the API open: give a key, or "
            f"serve without one by leaving out --api-key and unsetting {API_KEY_VARIABLE}"
        )
    for position, character in enumerate(stripped):
        if not " " <= character <= "~":
            raise SpeculorError(
                f"{source} holds U+{ord(character):04X} at position {position + 1}, which clients cannot send in an "
                "Authorization header: use printable ASCII"
            )
    if stripped != key:
        progress(f"{source}: whitespace around the key stripped (clients cannot send it)")
    return stripped


def parse_allowed_hosts(text: str) -> list[str]:
    """The entries of --allowed-hosts: host names, IPv4 or IPv6 addresses (bracketed or not), `*.domain`, or `*`."""
    hosts = [entry.strip() for entry in text.split(",")]
    for host in hosts:
        name = host.removeprefix("*.").removeprefix("[").removesuffix("]")
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            address = None
        if host == "*" or (address is not None and not host.startswith("*.")) or HOST_NAME.fullmatch(name):
            continue
        shown = host if len(host) <= 100 else f"{host[:100]}… ({len(host)} characters)"
        raise SpeculorError(
            f"--allowed-hosts: {shown!r} is not a host name or address; give names or addresses without ports "
            "(any port is allowed), separated by commas, *.example.com for subdomains, or * for any host"
        )
    return hosts


def check_settings(args: argparse.Namespace) -> None:
    """Refuse, with one line naming the option, every setting that cannot work; strip the API key."""
    if not 0 <= args.port <= 65535:
        raise SpeculorError(f"--port must be between 0 and 65535, got {args.port}")
    for option in ("--request-timeout", "--header-timeout", "--shutdown-timeout"):
        positive_number(option, getattr(args, option[2:].replace("-", "_")))
    at_least("--max-batch-size", args.max_batch_size, 1)
    at_least("--max-queue", args.max_queue, 0)
    at_least("--max-body-bytes", args.max_body_bytes, 1)
    at_least("--max-connections", args.max_connections, 1)
    if args.gamma is not None:
        at_least("--gamma", args.gamma, 1)
    if args.model_name is not None and not args.model_name.strip():
        raise SpeculorError("--model-name is empty: give the model id clients will send, or leave it out")
    if args.allowed_hosts is not None:
        args.allowed_hosts = parse_allowed_hosts(args.allowed_hosts)
    args.api_key = resolve_api_key(args)
    if args.api_key_all and not args.api_key:
        raise SpeculorError(f"--api-key-all needs an API key (--api-key or ${API_KEY_VARIABLE})")


def apply_config(args: argparse.Namespace) -> None:
    """Take target, draft and γ from --config where the command line leaves them out (an explicit --gamma wins),
    and print what was applied."""
    given_gamma = args.gamma
    applied = apply_config_file(args)
    if applied is None:
        return
    gamma = args.gamma
    if gamma is not None and (not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1):
        raise SpeculorError(f"config {args.config!r}: gamma must be an integer of at least 1, got {gamma!r}")
    if given_gamma is not None:
        config_gamma = config_choice(json.loads(Path(args.config).read_text()), 0.0).get("gamma")
        theirs = "names no γ" if config_gamma is None else f"has γ {config_gamma}"
        applied += f" (from --gamma, which wins; the config {theirs})"
    progress(applied)


def allowed_hosts(args: argparse.Namespace, bound: str) -> list[str] | None:
    """The Host names to answer to: --allowed-hosts, else the loopback names (and --host) when bound to a loopback
    address, else None (any host); prints which."""
    if args.allowed_hosts is not None:
        hosts = None if "*" in args.allowed_hosts else args.allowed_hosts
    elif ipaddress.ip_address(bound.split("%")[0]).is_loopback:
        hosts = list(dict.fromkeys([*LOOPBACK_HOSTS, args.host.lower().strip("[]")]))
    else:
        progress(f"Host header not checked: bound to {bound}, not a loopback address (--allowed-hosts checks it)")
        return None
    if hosts is None:
        progress("Host header not checked (--allowed-hosts *)")
    else:
        progress(f"Host header checked: {', '.join(hosts)} with any port (--allowed-hosts)")
    return hosts


def enough_file_descriptors(connections: int) -> None:
    """Raise the soft limit on open files to fit `connections` (as far as the hard limit allows), or say it cannot:
    past it, accepting a connection fails instead of answering 503."""
    import resource  # Unix only

    needed = connections + SPARE_FILE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        progress(
            f"warning: --max-connections {connections} needs about {needed} open files and this process may open "
            f"only {target} (ulimit -n)"
        )


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

    follower = args.tensor_parallel > 1 and replicas.serving_rank() > 0
    if follower:
        # A follower rank: no port, nothing printed; it replays rank 0's engine (speculor.server.replicas).
        quiet_rank()
    check_settings(args)
    apply_config(args)
    # Read before the models load, so an unreadable file fails at once.
    args.chat_template_text = read_chat_template(args.chat_template)
    if follower:
        return load_and_serve(args, None)
    with listening_socket(args.host, args.port) as sock, replicas.spawned_followers(args.tensor_parallel):
        return load_and_serve(args, sock)


def read_chat_template(path: str | None) -> str | None:
    """The text of --chat-template's file (None: the tokenizer's own template)."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SpeculorError(f"--chat-template {path!r} cannot be read: {error}") from error


def load_and_serve(args: argparse.Namespace, sock: socket.socket | None) -> int:
    """Load the models, warm them up and serve on the already bound `sock` until uvicorn stops; a follower
    tensor-parallel rank (no `sock`) replays rank 0's engine instead."""
    import uvicorn

    from speculor.api import SpeculativeDecoder
    from speculor.server import replicas
    from speculor.server.app import create_app
    from speculor.server.connections import guarded_protocol
    from speculor.threads import use_cpu_threads

    use_cpu_threads(args.threads, args.device)  # --threads comes with add_model_arguments
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
        allowed_hosts=allowed_hosts(args, sock.getsockname()[0]),
        chat_template=args.chat_template_text,
        tool_call_parser=args.tool_call_parser,
    )
    enough_file_descriptors(args.max_connections)
    gamma = "chosen each step" if args.gamma is None else args.gamma
    console.print(
        f"serving {app.state.served.name!r} on http://{args.host}:{sock.getsockname()[1]}/v1 (draft: {drafting}; "
        f"γ {gamma})",
        soft_wrap=True,
    )
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
        http=guarded_protocol(args.max_connections, args.header_timeout),
    )
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
