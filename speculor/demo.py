"""`speculor demo`: the shipped target and its best draft complete a few Python function headers, once with the
target alone and once speculatively, and a table shows both side by side: the completion, the acceptance rate, the
mean accepted length, tokens per second, the speedup and whether greedy output is identical (it must be).

It needs no download and no argument, so it is the first thing to run after installing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from speculor.errors import SpeculorError
from speculor.threads import add_threads_argument
from speculor.wording import counted

if TYPE_CHECKING:
    from speculor.engine import GenerationResult

# Headers written for this demo (not taken from any benchmark set); greedy decoding makes each run repeatable.
DEMO_PROMPTS = (
    "class Stack:\n"
    '    """A last-in, first-out stack."""\n\n'
    "    def __init__(self):\n"
    "        self.items = []\n\n"
    "    def push(self, item):\n",
    'def word_count(text):\n    """Count how often each word occurs in text."""\n    counts = {}\n',
    'import os\n\n\ndef list_python_files(directory):\n    """Return the paths of all .py files under directory."""\n',
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n',
)
SHOWN_LINES = 12


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="complete a few Python headers with the shipped models, target alone vs speculative",
        description="Load the shipped target and best draft (CUDA when available, else CPU) and compare decoding "
        "with the target alone against speculative decoding on a few Python function headers.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per completion at most (default 96)")
    parser.add_argument("--gamma", type=int, default=4, help="tokens drafted per step (default 4)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_threads_argument(parser)
    parser.set_defaults(handler=run_demo)


def _completion_panel(prompt: str, result: GenerationResult, number: int) -> Panel:
    """The prompt (dimmed) and the start of its completion; a long completion says how much is not shown."""
    lines = (result.text or "").rstrip("\n").splitlines()
    body = Text(prompt, style="dim")
    body.append("\n".join(lines[:SHOWN_LINES]))
    if len(lines) > SHOWN_LINES:
        body.append(f"\n… {counted(len(lines) - SHOWN_LINES, 'more line')}", style="italic dim")
    return Panel(body, title=f"prompt {number}", title_align="left", expand=False)


def _identical_cell(identical: bool) -> Text:
    return Text(str(identical), style="green" if identical else "bold red")


def _rate(results: Iterable[GenerationResult]) -> float:
    """Tokens per second over several generations: total tokens over total time."""
    tokens = seconds = 0.0
    for result in results:
        tokens += result.stats.new_tokens
        seconds += result.stats.wall_seconds
    return tokens / max(seconds, 1e-9)


def run_demo(args: argparse.Namespace) -> int:
    from speculor.api import SpeculativeDecoder
    from speculor.models import shipped
    from speculor.threads import use_cpu_threads

    # Arguments first: a mistake must not cost the seconds of loading the models.
    if args.gamma < 1:
        raise SpeculorError(f"--gamma must be at least 1, got {args.gamma}")
    if args.max_new_tokens < 1:
        raise SpeculorError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    threads = use_cpu_threads(args.threads, args.device)
    console = Console(highlight=False)
    family = shipped()
    began = time.perf_counter()
    # float32 even on a GPU: the models are tiny, and it keeps greedy ties from rounding differently.
    decoder = SpeculativeDecoder(
        family.target,
        family.best_draft,
        device=args.device,
        dtype="float32",
        threads=None if threads is None else threads.threads,
    )
    console.print(
        f"[bold]speculor demo[/bold]: target [cyan]{family.target.name}[/cyan], draft "
        f"[cyan]{family.best_draft_name}[/cyan], {decoder.device}"
        f"{'' if threads is None else f' ({threads.describe()})'}, γ={args.gamma}, greedy, "
        f"loaded in {time.perf_counter() - began:.1f} s"
    )
    options = {"max_new_tokens": args.max_new_tokens, "gamma": args.gamma}
    # One short run each way first, so one-time costs (allocations, caches) are not billed to the first prompt.
    decoder.generate(DEMO_PROMPTS[0], max_new_tokens=8, speculative=False)
    decoder.generate(DEMO_PROMPTS[0], max_new_tokens=8)

    table = Table(title="target alone vs speculative, greedy")
    table.add_column("prompt")
    for column in ("target alone\ntok/s", "speculative\ntok/s", "speedup", "TAR", "accepted\nper forward"):
        table.add_column(column, justify="right")
    table.add_column("identical", justify="center")
    runs: list[tuple[GenerationResult, GenerationResult]] = []
    for number, prompt in enumerate(DEMO_PROMPTS, start=1):
        alone = decoder.generate(prompt, speculative=False, **options)
        speculative = decoder.generate(prompt, **options)
        runs.append((alone, speculative))
        console.print(_completion_panel(prompt, speculative, number))
        stats, base = speculative.stats, alone.stats
        table.add_row(
            str(number),
            f"{base.tokens_per_second:.1f}",
            f"{stats.tokens_per_second:.1f}",
            f"{stats.tokens_per_second / max(base.tokens_per_second, 1e-9):.2f}x",
            f"{stats.acceptance_rate:.2f}",
            f"{stats.mean_accepted_length:.2f}",
            _identical_cell(alone.token_ids == speculative.token_ids),
        )
    table.add_section()
    alone_rate = _rate(alone for alone, _ in runs)
    speculative_rate = _rate(speculative for _, speculative in runs)
    drafted = sum(speculative.stats.drafted for _, speculative in runs)
    accepted = sum(speculative.stats.accepted for _, speculative in runs)
    forwards = sum(speculative.stats.target_forwards for _, speculative in runs)
    tokens = sum(speculative.stats.new_tokens for _, speculative in runs)
    table.add_row(
        Text("all", style="bold"),
        f"{alone_rate:.1f}",
        f"{speculative_rate:.1f}",
        Text(f"{speculative_rate / max(alone_rate, 1e-9):.2f}x", style="bold"),
        f"{accepted / max(drafted, 1):.2f}",
        f"{tokens / max(forwards, 1):.2f}",
        _identical_cell(all(alone.token_ids == speculative.token_ids for alone, speculative in runs)),
    )
    console.print(table)
    console.print(
        "[dim]TAR: share of drafted tokens the target accepted. Accepted per forward (mean accepted length): tokens "
        "emitted per target forward, bonus token included. Identical: speculative output equals the target's own "
        f"greedy output, token for token. Total time {time.perf_counter() - began:.1f} s.[/dim]"
    )
    return 0
