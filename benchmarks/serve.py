"""Serving throughput and latency under concurrency, speculative decoding against the target alone.

    python benchmarks/serve.py --quick                              # CPU smoke run: shipped pair, small load
    python benchmarks/serve.py                                      # shipped pair, concurrency 1 4 16 64
    python benchmarks/serve.py --target T --draft D --device cuda --max-batch-size 64 --json serve.json
    python benchmarks/serve.py ... --extra '{"guided_json": SCHEMA}'      # every request under a JSON schema
    python benchmarks/serve.py ... --extra '{"presence_penalty": 0.5, "repetition_penalty": 1.1}'   # penalties

Each mode starts `python -m speculor serve` as its own process on a free 127.0.0.1 port (the server a user would
run, batching up to `--max-batch-size` requests; speculative with its load-aware γ unless `--gamma` is given); the
modes take turns at each concurrency, so a shared machine's changing load falls on both alike. Each run is a closed
loop: `c` clients, each sending its next streamed greedy request as soon as its last one ends, until `--requests`
have been answered; every mode and concurrency sends the same prompts in the same order, so both modes generate the
same tokens (checked and reported) and only the time differs.

Reported per mode and concurrency: requests/s, output tokens/s, time to first token (TTFT) p50/p99, and per-token
latency p50/p99. Speculative decoding delivers several tokens in one chunk, so a per-chunk latency would overstate
its gaps: the server's per-chunk usage counts (`stream_options.continuous_usage_stats`) say how many tokens each
chunk carried, and the gap before a chunk is split evenly among its tokens (the first chunk's tokens count in TTFT).

Needs only httpx on the client side; the server side needs the web stack (fastapi, uvicorn, pydantic), which a
machine without it can get as wheels (see the report for the exact GPU command).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from speculor.prompts import load_prompts
from speculor.provenance import source_revision

MODEL_NAME = "bench"
QUICK = {"requests": 8, "concurrency": [1, 4], "max_tokens": 16, "max_batch_size": 8}


@dataclass
class Answer:
    text: str
    time_to_first_token: float
    token_latencies: list[float]
    completion_tokens: int
    drafted: int
    accepted: int


@dataclass
class Row:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    requests_per_second: float
    output_tokens_per_second: float
    time_to_first_token_p50: float
    time_to_first_token_p99: float
    token_latency_p50: float
    token_latency_p99: float
    drafted: int
    acceptance_rate: float


def shipped_pair() -> tuple[str, str]:
    """The shipped target and its best draft."""
    from speculor.models import shipped

    family = shipped()
    return os.fspath(family.target), os.fspath(family.best_draft)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`speculor serve` in a child process with `threads` torch threads; stopped with SIGINT, the graceful path a
    user's Ctrl-C takes."""

    def __init__(self, arguments: list[str], threads: int, startup_seconds: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "speculor", "serve", *arguments, "--port", str(self.port)]
        self.command = command
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(
            [*command, "--model-name", MODEL_NAME, "--log-level", "warning"], env=environment
        )
        deadline = time.monotonic() + startup_seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.process.returncode}: {shlex.join(command)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start within {startup_seconds:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def ask(client: httpx.AsyncClient, prompt: str, max_tokens: int, ignore_eos: bool, extra: dict) -> Answer:
    """One streamed greedy completion, with the arrival time and token count of every chunk; `extra` fields (sampling
    options, a structure) go into every request's body."""
    body = {
        **extra,
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "ignore_eos": ignore_eos,
    }
    started = time.perf_counter()
    first_token: float | None = None
    last_arrival, tokens_seen = started, 0
    token_latencies: list[float] = []
    pieces: list[str] = []
    final: dict = {}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if not event["choices"]:
                final = event
                continue
            pieces.append(event["choices"][0]["text"])
            arrived, tokens = time.perf_counter(), event["usage"]["completion_tokens"]
            if tokens > tokens_seen:
                if first_token is None:
                    first_token = arrived - started
                else:
                    gap = (arrived - last_arrival) / (tokens - tokens_seen)
                    token_latencies += [gap] * (tokens - tokens_seen)
                last_arrival, tokens_seen = arrived, tokens
    speculative = final["speculative"]
    return Answer(
        "".join(pieces),
        first_token if first_token is not None else time.perf_counter() - started,
        token_latencies,
        final["usage"]["completion_tokens"],
        speculative["drafted"],
        speculative["accepted"],
    )


async def closed_loop(
    url: str, prompts: list[str], concurrency: int, max_tokens: int, ignore_eos: bool, extra: dict
) -> tuple[list[Answer], float]:
    """Answers in prompt order, and the wall time to get them all with `concurrency` clients."""
    answers: list[Answer | None] = [None] * len(prompts)
    next_index = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(prompts):
            index, next_index = next_index, next_index + 1
            answers[index] = await ask(client, prompts[index], max_tokens, ignore_eos, extra)

    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        await ask(client, prompts[0], max_tokens, ignore_eos, extra)  # warm-up, not timed
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return [answer for answer in answers if answer is not None], seconds


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile; 0 for no values (a run whose answers were all one token long)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarize(mode: str, concurrency: int, answers: list[Answer], seconds: float) -> Row:
    first_tokens = [answer.time_to_first_token for answer in answers]
    token_latencies = [latency for answer in answers for latency in answer.token_latencies]
    drafted = sum(answer.drafted for answer in answers)
    return Row(
        mode=mode,
        concurrency=concurrency,
        requests=len(answers),
        seconds=seconds,
        requests_per_second=len(answers) / seconds,
        output_tokens_per_second=sum(answer.completion_tokens for answer in answers) / seconds,
        time_to_first_token_p50=statistics.median(first_tokens),
        time_to_first_token_p99=percentile(first_tokens, 0.99),
        token_latency_p50=percentile(token_latencies, 0.5),
        token_latency_p99=percentile(token_latencies, 0.99),
        drafted=drafted,
        acceptance_rate=sum(answer.accepted for answer in answers) / drafted if drafted else 0.0,
    )


def markdown_table(rows: list[Row]) -> str:
    baseline = {row.concurrency: row for row in rows if row.mode == "target alone"}
    lines = [
        "| mode | concurrency | requests/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | per-token p50 (ms) "
        "| per-token p99 (ms) | TAR | speedup (tok/s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = baseline.get(row.concurrency)
        speedup = f"{row.output_tokens_per_second / base.output_tokens_per_second:.2f}x" if base else "—"
        tar = f"{row.acceptance_rate:.3f}" if row.drafted else "— (none drafted)" if row.mode != "target alone" else "—"
        lines.append(
            f"| {row.mode} | {row.concurrency} | {row.requests_per_second:.2f} | {row.output_tokens_per_second:.1f} "
            f"| {row.time_to_first_token_p50 * 1e3:.1f} | {row.time_to_first_token_p99 * 1e3:.1f} "
            f"| {row.token_latency_p50 * 1e3:.2f} | {row.token_latency_p99 * 1e3:.2f} | {tar} | {speedup} |"
        )
    return "\n".join(lines)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="target model (default: the shipped target)")
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument("--draft", help="draft model (default: the shipped best draft)")
    drafting.add_argument("--ngram", type=int, help="draft by prompt lookup instead")
    parser.add_argument("--gamma", type=int, help="fixed γ for the speculative server (default: load-aware)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", help="server dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="batch slots of each server")
    parser.add_argument("--prompts", default="humaneval", help="prompt set name or JSONL file")
    parser.add_argument("--requests", type=int, default=128, help="requests per mode and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens per request")
    parser.add_argument(
        "--extra",
        type=json.loads,
        default={},
        help="JSON object of fields added to every request, the same in both modes: sampling options or a structure, "
        'e.g. \'{"presence_penalty": 0.5, "repetition_penalty": 1.1}\' or \'{"guided_json": {"type": "object"}}\'',
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each server (OMP_NUM_THREADS); 1 keeps a shared machine's other work from stalling "
        "OpenMP's spinning threads",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a CPU smoke run: {QUICK['requests']} requests at concurrency {QUICK['concurrency']}, "
        f"{QUICK['max_tokens']} tokens each, {QUICK['max_batch_size']} batch slots",
    )
    parser.add_argument("--json", type=Path, help="also write the rows and settings here")
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def main() -> int:
    args = parse_arguments()
    target, draft = args.target, args.draft
    if target is None:
        target, shipped_draft = shipped_pair()
        if draft is None and args.ngram is None:
            draft = shipped_draft
    drafting_arguments = ["--draft", draft] if draft else ["--ngram", str(args.ngram)] if args.ngram else []
    if not drafting_arguments:
        sys.exit("give --draft or --ngram (or neither --target nor --draft for the shipped pair)")
    prompt_set = load_prompts(args.prompts, limit=args.requests)
    prompts = [prompt_set[index % len(prompt_set)] for index in range(args.requests)]
    common = ["--target", target, "--device", args.device, "--max-batch-size", str(args.max_batch_size)]
    common += ["--dtype", args.dtype] if args.dtype else []
    gamma = ["--gamma", str(args.gamma)] if args.gamma else []
    modes = {"target alone": common, "speculative": [*common, *drafting_arguments, *gamma]}
    load_before = os.getloadavg()
    rows: list[Row] = []
    texts: dict[str, list[str]] = {}
    commands: dict[str, str] = {}
    servers: dict[str, ServerProcess] = {}
    try:
        for mode, arguments in modes.items():
            servers[mode] = ServerProcess(arguments, args.threads)
            commands[mode] = shlex.join(servers[mode].command)
        for concurrency in args.concurrency:
            for mode, server in servers.items():
                answers, seconds = asyncio.run(
                    closed_loop(server.url, prompts, concurrency, args.max_tokens, args.ignore_eos, args.extra)
                )
                rows.append(summarize(mode, concurrency, answers, seconds))
                texts.setdefault(mode, [answer.text for answer in answers])
                print(
                    f"{mode}, concurrency {concurrency}: {rows[-1].output_tokens_per_second:.1f} output tokens/s",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    identical = sum(a == b for a, b in zip(texts["target alone"], texts["speculative"], strict=True))
    table = markdown_table(rows)
    print()
    print(table)
    print(f"\ngreedy answers identical between modes: {identical}/{len(prompts)}")
    load_after = os.getloadavg()
    print(f"{cpu_name()}, {os.cpu_count()} cores; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    if args.json:
        report = {
            "date": datetime.date.today().isoformat(),
            **source_revision(),
            "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores",
            "load_average_before": load_before,
            "load_average_after": load_after,
            "command": shlex.join([sys.executable, *sys.argv]),
            "servers": commands,
            "settings": {key: str(value) for key, value in vars(args).items()},
            "rows": [asdict(row) for row in rows],
            "identical": identical,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
