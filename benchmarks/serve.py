"""Serving throughput and latency: requests/s and p50/p95 latency at several concurrencies, speculative decoding
against the target alone.

    python benchmarks/serve.py                                    # shipped family, best draft, HumanEval, CPU
    python benchmarks/serve.py --target T --draft D --gamma 4 --concurrency 1 4 16 --requests 32 --max-tokens 64

Each mode starts `python -m speculor serve` as its own process on a free 127.0.0.1 port (the server a user would
run); the modes take turns at each concurrency, so a shared machine's changing load falls on both alike. Each run
is a closed loop: `c` clients, each sending its next streamed request as soon as its last one ends, until
`--requests` have been answered. Every mode and concurrency sends the same prompts in the same order with greedy
decoding, so both modes generate the same tokens (checked and reported); only the time differs. The server runs
one generation at a time, so requests/s should not grow with concurrency while latency grows about linearly with
it: the table shows how much of that queueing speculative decoding buys back.
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

MODEL_NAME = "bench"


@dataclass
class Answer:
    text: str
    latency: float
    time_to_first_token: float
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
    tokens_per_second: float
    latency_p50: float
    latency_p95: float
    time_to_first_token_p50: float
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

    def __init__(self, arguments: list[str], threads: int, startup_seconds: float = 300.0) -> None:
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


async def ask(client: httpx.AsyncClient, prompt: str, max_tokens: int, ignore_eos: bool) -> Answer:
    """One streamed greedy completion, timed from sending to the last event."""
    body = {
        "model": MODEL_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
    }
    started = time.perf_counter()
    first_token = None
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
            if event["choices"]:
                if first_token is None:
                    first_token = time.perf_counter() - started
                pieces.append(event["choices"][0]["text"])
            else:
                final = event
    latency = time.perf_counter() - started
    speculative = final["speculative"]
    return Answer(
        "".join(pieces),
        latency,
        first_token if first_token is not None else latency,
        final["usage"]["completion_tokens"],
        speculative["drafted"],
        speculative["accepted"],
    )


async def closed_loop(
    url: str, prompts: list[str], concurrency: int, max_tokens: int, ignore_eos: bool
) -> tuple[list[Answer], float]:
    """Answers in prompt order, and the wall time to get them all with `concurrency` clients."""
    answers: list[Answer | None] = [None] * len(prompts)
    next_index = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(prompts):
            index, next_index = next_index, next_index + 1
            answers[index] = await ask(client, prompts[index], max_tokens, ignore_eos)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        await ask(client, prompts[0], max_tokens, ignore_eos)  # warm-up, not timed
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return [answer for answer in answers if answer is not None], seconds


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarize(mode: str, concurrency: int, answers: list[Answer], seconds: float) -> Row:
    latencies = [answer.latency for answer in answers]
    drafted = sum(answer.drafted for answer in answers)
    return Row(
        mode=mode,
        concurrency=concurrency,
        requests=len(answers),
        seconds=seconds,
        requests_per_second=len(answers) / seconds,
        tokens_per_second=sum(answer.completion_tokens for answer in answers) / seconds,
        latency_p50=statistics.median(latencies),
        latency_p95=percentile(latencies, 0.95),
        time_to_first_token_p50=statistics.median(answer.time_to_first_token for answer in answers),
        acceptance_rate=sum(answer.accepted for answer in answers) / drafted if drafted else 0.0,
    )


def markdown_table(rows: list[Row]) -> str:
    baseline = {row.concurrency: row for row in rows if row.mode == "target alone"}
    lines = [
        "| mode | concurrency | requests/s | tokens/s | p50 latency (s) | p95 latency (s) | p50 TTFT (s) | TAR "
        "| speedup (req/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = baseline.get(row.concurrency)
        speedup = f"{row.requests_per_second / base.requests_per_second:.2f}x" if base else "—"
        tar = f"{row.acceptance_rate:.3f}" if row.mode != "target alone" else "—"
        lines.append(
            f"| {row.mode} | {row.concurrency} | {row.requests_per_second:.3f} | {row.tokens_per_second:.1f} "
            f"| {row.latency_p50:.2f} | {row.latency_p95:.2f} | {row.time_to_first_token_p50:.3f} | {tar} | {speedup} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="target model (default: the shipped target)")
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument("--draft", help="draft model (default: the shipped best draft)")
    drafting.add_argument("--ngram", type=int, help="draft by prompt lookup instead")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", default="humaneval", help="prompt set name or JSONL file")
    parser.add_argument("--requests", type=int, default=32, help="requests per mode and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-tokens per request")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server (OMP_NUM_THREADS); 1 keeps a shared "
        "machine's other work from stalling OpenMP's spinning threads",
    )
    parser.add_argument("--json", type=Path, help="also write the rows and settings here")
    args = parser.parse_args()

    target, draft = args.target, args.draft
    if target is None:
        target, shipped_draft = shipped_pair()
        if draft is None and args.ngram is None:
            draft = shipped_draft
    drafting_arguments = ["--draft", draft] if draft else ["--ngram", str(args.ngram)] if args.ngram else []
    if not drafting_arguments:
        parser.error("give --draft or --ngram (or neither --target nor --draft for the shipped pair)")
    prompts = load_prompts(args.prompts, limit=args.requests)
    common = ["--target", target, "--device", args.device]
    modes = {
        "target alone": common,
        "speculative": [*common, *drafting_arguments, "--gamma", str(args.gamma)],
    }
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
                    closed_loop(server.url, prompts, concurrency, args.max_tokens, args.ignore_eos)
                )
                rows.append(summarize(mode, concurrency, answers, seconds))
                texts.setdefault(mode, [answer.text for answer in answers])
                print(f"{mode}, concurrency {concurrency}: {rows[-1].requests_per_second:.3f} requests/s", flush=True)
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
