"""`speculor bench`: measure drafts, γ and adaptive policies against the target alone, and recommend the best.

The target is loaded once: every drafter gets its own `SpeculativeDecoder` built on the already loaded target
model (each with its own runner and cache), so only the drafts are loaded per drafter. Configurations, per
temperature: the target alone, then for each drafter its fixed γ values, then (with `--adaptive`) the
confidence-threshold and Leviathan policies. Every runner first prefills every prompt once, and each configuration
gets its untimed warm-up generations (on the longest prompt, then the shortest); then the timed runs go prompt by
prompt, every configuration on a prompt before the next prompt, with seed `--seed + prompt index`. That order puts
each configuration's run next to the baseline's run on the same prompt, so the per-prompt speedup ratios stay fair
when the machine's load drifts during a long benchmark.

With `--batch-size 1,4,16`, every configuration also runs at each batch size: a run is then one batch of that many
prompts generated together (the prompt list repeats when shorter), every configuration on a batch before the next
batch, and the engine's load-aware γ policy joins the configurations, so the report shows how throughput (total and
per row) and the γ that policy drafts change with the batch size.

The Leviathan policy needs the cost ratio c before any timed run, so it is measured up front by timing
single-token forwards of the draft and the target after the same prefill. Adaptive policies apply to draft models
only: prompt lookup has no draft probabilities to threshold, and its near-zero cost would always make the Leviathan
policy pick the largest γ.

The measuring happens here; `speculor.bench_report` turns the records into tables, plots and files. torch,
transformers and the models are imported inside the functions that use them, so that defining the command's options
(every `speculor` command does, `--help` included) stays quick.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from speculor.adaptive import ConfidenceThreshold, FixedGamma, GammaPolicy, LeviathanGamma
from speculor.cli import (
    DTYPE_CHOICES,
    RUNNER_CHOICES,
    add_kernels_argument,
    add_tensor_parallel_argument,
    console,
    quiet_rank,
)
from speculor.errors import SpeculorError
from speculor.provenance import source_revision
from speculor.threads import add_threads_argument
from speculor.wording import counted

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from speculor.api import SpeculativeDecoder
    from speculor.bench_report import BenchConfig, ConfigResult
    from speculor.runners import Runner

DEFAULT_GAMMAS = (1, 2, 4, 6, 8)
# Tokens of the short generations that measure the target's pace for the cost estimate printed before starting.
PACE_TOKENS = 16
DEFAULT_CONFIDENCE_THRESHOLD = 0.4  # Hugging Face's default `assistant_confidence_threshold`.


class RejectionCounter:
    """Passes a γ policy through to the engine and counts the steps that ended at a rejected draft, which the
    per-token acceptance estimate α needs and the engine's statistics do not keep."""

    def __init__(self, policy: GammaPolicy) -> None:
        self.policy = policy
        self.rejections = 0

    def next_gamma(self) -> int:
        return self.policy.next_gamma()

    def observe(self, drafted: int, accepted: int) -> None:
        self.rejections += accepted < drafted
        self.policy.observe(drafted, accepted)

    @property
    def confidence_threshold(self) -> float | None:
        return self.policy.confidence_threshold


@dataclass(frozen=True)
class Drafter:
    """A draft model or an n-gram lookup, with the decoder that drafts that way for the shared target."""

    draft: str | None
    ngram: int | None
    decoder: SpeculativeDecoder


@dataclass(frozen=True)
class BenchSettings:
    max_new_tokens: int
    ignore_eos: bool
    seed: int
    warmup: int


@dataclass(frozen=True)
class Plan:
    """One configuration to run: what it is, the decoder that runs it, and how to make a fresh γ policy (one per
    generation, so that prompts do not influence each other); None leaves γ to the engine's load-aware policy."""

    config: BenchConfig
    decoder: SpeculativeDecoder
    make_policy: Callable[[], GammaPolicy] | None


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_seconds(runner: Runner, prompt_ids: list[int], repeats: int) -> float:
    """Mean time of a one-token step after `prompt_ids` minus its last token are in slot 0's cache (one untimed
    step first, so a graph capture or first-call cost is not counted)."""
    import torch

    ids = torch.tensor(prompt_ids, dtype=torch.long, device=runner.device)
    committed = len(prompt_ids) - 1
    last = ids[committed:][None]
    runner.reset(0)
    runner.extend(0, ids[:committed])
    runner.step([0], last)
    runner.rollback(0, committed)
    _synchronize(runner.device)
    started = time.perf_counter()
    for _ in range(repeats):
        runner.step([0], last)
        runner.rollback(0, committed)
    _synchronize(runner.device)
    return (time.perf_counter() - started) / repeats


def forward_cost_ratio(decoder: SpeculativeDecoder, prompt_ids: list[int], repeats: int = 20) -> float:
    """c from single-token forwards: draft forward time / target forward time on the same prompt."""
    if decoder.draft_runner is None:
        raise SpeculorError("forward_cost_ratio needs a decoder with a draft model")
    draft = _forward_seconds(decoder.draft_runner, prompt_ids, repeats)
    return draft / _forward_seconds(decoder.target_runner, prompt_ids, repeats)


def plan_configurations(
    args: argparse.Namespace,
    baseline: SpeculativeDecoder,
    drafters: Sequence[Drafter],
    cost_ratios: dict[str, float],
) -> list[Plan]:
    """Every configuration in run order; `cost_ratios` maps each draft to the c its Leviathan policy uses. The
    load-aware policy (the engine's default, which picks γ for a whole batch) runs with --adaptive or whenever a
    batch size above 1 is swept."""
    from speculor.bench_report import BenchConfig

    plans = []
    top = max(args.gamma)
    load_aware = args.adaptive or max(args.batch_size) > 1
    for size in args.batch_size:
        for temperature in args.temperature:
            plans.append(Plan(BenchConfig(temperature, batch_size=size), baseline, partial(FixedGamma, 1)))
            for drafter in drafters:
                draft, ngram, decoder = drafter.draft, drafter.ngram, drafter.decoder
                for gamma in args.gamma:
                    config = BenchConfig(temperature, "fixed", draft, ngram, gamma, size)
                    plans.append(Plan(config, decoder, partial(FixedGamma, gamma)))
                if args.adaptive and draft is not None:
                    confidence = partial(ConfidenceThreshold, top, args.confidence_threshold)
                    config = BenchConfig(temperature, "confidence", draft, None, top, size)
                    plans.append(Plan(config, decoder, confidence))
                    leviathan = partial(LeviathanGamma, top, cost_ratio=cost_ratios[draft])
                    plans.append(
                        Plan(BenchConfig(temperature, "leviathan", draft, None, top, size), decoder, leviathan)
                    )
                if load_aware:
                    plans.append(Plan(BenchConfig(temperature, "load-aware", draft, ngram, None, size), decoder, None))
    return plans


def batches(prompts: int, size: int) -> list[list[int]]:
    """Prompt indices of each batch at batch size `size`: every prompt at least once, every batch full (the list
    repeats when it is shorter than a batch), so a batch size's throughput is measured at that many rows."""
    count = max(1, -(-prompts // size))
    return [[(batch * size + row) % prompts for row in range(size)] for batch in range(count)]


def warmup_order(prompt_ids: list[list[int]]) -> list[int]:
    """Prompt indices for warm-up generations: the longest, the shortest, then the rest. The two extremes reach the
    largest and the smallest cache spans, so a static-cache runner captures its step shapes before timing starts."""
    by_length = sorted(range(len(prompt_ids)), key=lambda index: len(prompt_ids[index]))
    return list(dict.fromkeys([by_length[-1], by_length[0], *by_length[1:-1]]))


def _prefill_every_prompt(decoders: Sequence[SpeculativeDecoder], prompt_ids: list[list[int]]) -> None:
    """Run each prompt's prefill once on every runner: the first forward of a new sequence length pays one-time
    costs (GPU kernel selection for the new shapes) that would otherwise land in whichever timed run came first."""
    import torch

    unique = {id(decoder): decoder for decoder in decoders}.values()
    runners = [r for decoder in unique for r in (decoder.target_runner, decoder.draft_runner) if r is not None]
    for runner in runners:
        for ids in prompt_ids:
            runner.reset(0)
            runner.extend(0, torch.tensor(ids[:-1], dtype=torch.long, device=runner.device))


def run_plans(
    plans: Sequence[Plan], prompt_ids: list[list[int]], settings: BenchSettings, progress: tqdm
) -> tuple[list[ConfigResult], bool]:
    """Warm every runner and configuration up, then run batch by batch (one prompt each at batch size 1), every
    configuration of a batch size on a batch before the next batch (see the module docstring for why).

    Returns the results and whether Ctrl-C cut the run short. An interrupted run keeps, per batch size, the batches
    that every configuration finished (`finished_batches`), so what it saves still compares like with like."""
    from speculor.api import run_batch
    from speculor.bench_report import ConfigResult, PromptRun, batch_run

    def generate(plan: Plan, index: int, rows: list[int], seeds: list[int]) -> PromptRun:
        progress.set_postfix_str(plan.config.label, refresh=False)
        counters = [RejectionCounter(plan.make_policy()) if plan.make_policy else None for _ in rows]
        requests = [
            plan.decoder.request(
                prompt_ids[row],
                gamma=counter,
                seed=seed,
                max_new_tokens=settings.max_new_tokens,
                temperature=plan.config.temperature,
                ignore_eos=settings.ignore_eos,
                speculative=plan.config.policy != "target",
            )
            for row, seed, counter in zip(rows, seeds, counters, strict=True)
        ]
        engine = plan.decoder.new_engine()
        _synchronize(plan.decoder.device)
        started = time.perf_counter()
        generations = run_batch(engine, requests)
        wall_seconds = time.perf_counter() - started
        progress.update(len(rows))
        rejections = None if plan.make_policy is None else sum(counter.rejections for counter in counters if counter)
        if len(rows) == 1:
            only = generations[0]
            return PromptRun(index, only.stats.to_dict(), only.token_ids, rejections)
        stats = [generation.stats.to_dict() for generation in generations]
        return batch_run(index, stats, [g.token_ids for g in generations], wall_seconds, rejections)

    results = [ConfigResult(plan.config) for plan in plans]
    try:
        decoders = list({id(plan.decoder): plan.decoder for plan in plans}.values())
        _prefill_every_prompt(decoders, prompt_ids)
        warmup_prompts = warmup_order(prompt_ids)
        for plan in plans:
            size = plan.config.batch_size
            # One warm-up batch reaches a batch size's step shapes; single prompts warm up longest and shortest first.
            turns = settings.warmup if size == 1 else min(settings.warmup, 1)
            for turn in range(turns):
                rows = [warmup_prompts[turn % len(warmup_prompts)]] if size == 1 else batches(len(prompt_ids), size)[0]
                generate(plan, turn, rows, [turn] * len(rows))
        for size in dict.fromkeys(plan.config.batch_size for plan in plans):
            sized = [
                (plan, result) for plan, result in zip(plans, results, strict=True) if plan.config.batch_size == size
            ]
            for index, rows in enumerate(batches(len(prompt_ids), size)):
                for plan, result in sized:
                    result.runs.append(generate(plan, index, rows, [settings.seed + row for row in rows]))
    except KeyboardInterrupt:
        return finished_batches(results), True
    return results, False


def finished_batches(results: Sequence[ConfigResult]) -> list[ConfigResult]:
    """What an interrupted run measured: per batch size, each configuration's runs over the batches that every
    configuration of that size finished (runs go batch by batch, so those are each one's first runs); a batch size
    where some configuration finished none is left out."""
    from speculor.bench_report import ConfigResult

    kept = []
    for size in dict.fromkeys(result.config.batch_size for result in results):
        sized = [result for result in results if result.config.batch_size == size]
        finished = min(len(result.runs) for result in sized)
        if finished:
            kept += [ConfigResult(result.config, result.runs[:finished]) for result in sized]
    return kept


def finished_text(results: Sequence[ConfigResult], prompts: int) -> str:
    """How much of each batch size an interrupted run kept, e.g. "7 of 20 prompts, 1 of 5 batches of 4"."""
    parts = []
    for size in dict.fromkeys(result.config.batch_size for result in results):
        done = min(len(result.runs) for result in results if result.config.batch_size == size)
        planned = len(batches(prompts, size))
        unit = counted(planned, "prompt") if size == 1 else counted(planned, f"batch of {size}", f"batches of {size}")
        parts.append(f"{done} of {unit}")
    return ", ".join(parts)


def generation_pace(decoder: SpeculativeDecoder, prompt_ids: list[int]) -> float:
    """Seconds per token of the target alone on this machine, prefill included: the second of two short
    generations (the first pays one-time costs). It prices the benchmark before it starts."""
    options = {"max_new_tokens": PACE_TOKENS, "speculative": False, "ignore_eos": True}
    decoder.generate(prompt_ids, **options)
    stats = decoder.generate(prompt_ids, **options).stats
    return stats.wall_seconds / max(stats.new_tokens, 1)


def duration_text(seconds: float) -> str:
    """A rough duration as a person would say it: "40 s", "12 min", "1 h 16 min"."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def planned_work(plans: Sequence[Plan], prompts: int, warmup: int) -> tuple[int, int]:
    """How many engine runs (one prompt, or one batch of B rows) and generations (rows) the plans take over
    `prompts` prompts, warm-up included (`run_plans` warms a batch size above 1 up with at most one batch)."""
    runs = generations = 0
    for plan in plans:
        size = plan.config.batch_size
        turns = warmup if size == 1 else min(warmup, 1)
        runs += len(batches(prompts, size)) + turns
        generations += sum(map(len, batches(prompts, size))) + turns * size
    return runs, generations


def cost_text(plans: Sequence[Plan], prompts: int, settings: BenchSettings, seconds_per_token: float) -> str:
    """What the benchmark will cost, said before it starts: its generations and the time they take at the target
    alone's pace (speculative configurations are usually faster; a batch's steps are slower than one row's)."""
    runs, generations = planned_work(plans, prompts, settings.warmup)
    estimate = duration_text(runs * settings.max_new_tokens * seconds_per_token)
    batched = any(plan.config.batch_size > 1 for plan in plans)
    return (
        f"{counted(len(plans), 'configuration')}, {counted(generations, 'generation')} of up to "
        f"{counted(settings.max_new_tokens, 'token')} (warm-up included). The target alone makes "
        f"{1 / seconds_per_token:.1f} tok/s here, so this takes {'at least ' if batched else ''}about {estimate} "
        "(speculative configurations are usually faster). Ctrl-C stops it and saves what every configuration "
        "finished."
    )


def parse_list(kind: type, minimum: float) -> Callable[[str], list]:
    """An argparse type for comma-separated numbers of one kind, each at least `minimum`."""

    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got {text!r}"
            ) from error
        if not values or any(value < minimum for value in values):
            raise argparse.ArgumentTypeError(f"expected values ≥ {minimum}, got {text!r}")
        return sorted(set(values))

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure drafts and γ against the target alone and recommend the best",
        description="Run the target alone and every (drafter, γ, temperature) over the same prompts; write "
        "results.json, results.csv, plots, report.md and best_config.json into --out.",
    )
    parser.add_argument("--target", required=True, help="target model: local directory or hub id")
    parser.add_argument("--draft", action="append", default=[], help="draft model (repeatable)")
    parser.add_argument("--ngram", action="append", type=int, default=[], help="prompt lookup up to n (repeatable)")
    parser.add_argument("--gamma", type=parse_list(int, 1), default=list(DEFAULT_GAMMAS), help="e.g. 1,2,4,6,8")
    parser.add_argument(
        "--batch-size",
        type=parse_list(int, 1),
        default=[1],
        help="rows generated together, e.g. 1,4,16,64: every configuration at each size, plus the load-aware γ "
        "policy when a size is above 1 (default 1)",
    )
    parser.add_argument("--adaptive", action="store_true", help="also run the confidence and Leviathan γ policies")
    parser.add_argument(
        "--confidence-threshold", type=float, default=DEFAULT_CONFIDENCE_THRESHOLD, help="for --adaptive"
    )
    parser.add_argument("--temperature", type=parse_list(float, 0.0), default=[0.0], help="e.g. 0,0.8")
    parser.add_argument("--prompts", default="humaneval", help="humaneval, spec-bench, mt-bench or FILE.jsonl")
    parser.add_argument("--num-prompts", type=int, default=20, help="prompts to use (spread over categories)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly --max-new-tokens per prompt (default) so every configuration does the same work",
    )
    parser.add_argument("--runner", default="auto", choices=RUNNER_CHOICES, help="model runner")
    add_kernels_argument(parser)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bfloat16 on a GPU, float32 on the CPU")
    add_threads_argument(parser)
    add_tensor_parallel_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed generations per configuration (longest prompt, shortest, …)"
    )
    parser.add_argument("--out", required=True, help="directory for the results")
    parser.set_defaults(handler=run_bench)


def command_line(args: argparse.Namespace) -> str:
    """The `speculor bench` command that reproduces this run, every default spelled out."""
    parts = ["speculor", "bench", "--target", args.target]
    for draft in args.draft:
        parts += ["--draft", draft]
    for ngram in args.ngram:
        parts += ["--ngram", str(ngram)]
    parts += ["--gamma", ",".join(map(str, args.gamma)), "--temperature", ",".join(f"{t:g}" for t in args.temperature)]
    parts += ["--batch-size", ",".join(map(str, args.batch_size))]
    if args.adaptive:
        parts += ["--adaptive", "--confidence-threshold", f"{args.confidence_threshold:g}"]
    parts += ["--prompts", args.prompts, "--num-prompts", str(args.num_prompts)]
    parts += ["--max-new-tokens", str(args.max_new_tokens), "--ignore-eos" if args.ignore_eos else "--no-ignore-eos"]
    parts += ["--runner", args.runner, "--kernels", args.kernels]
    parts += ["--seed", str(args.seed), "--warmup", str(args.warmup)]
    options = (("device", args.device), ("dtype", args.dtype), ("threads", args.threads))
    parts += [f"--{name}={value}" for name, value in options if value]
    parts += ["--out", args.out]
    return shlex.join(parts)


def _check_arguments(args: argparse.Namespace) -> None:
    if not args.draft and not args.ngram:
        raise SpeculorError("give at least one --draft or --ngram to compare against the target alone")
    if any(n < 1 for n in args.ngram):
        raise SpeculorError(f"--ngram must be ≥ 1, got {args.ngram}")
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.warmup < 0:
        raise SpeculorError("--num-prompts and --max-new-tokens must be ≥ 1, --warmup ≥ 0")
    if not 0 <= args.confidence_threshold <= 1:
        raise SpeculorError(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    if args.adaptive and args.tensor_parallel > 1:
        raise SpeculorError(
            "--adaptive times draft and target on each rank, whose γ would then differ: not with --tensor-parallel"
        )


def _device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU {_cpu_model()}, {threads} torch thread{'s' if threads != 1 else ''}"


def _cpu_model() -> str:
    """The processor's marketing name where Linux reports it, else the architecture."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from rich.console import Console
    from rich.markup import escape
    from tqdm import tqdm

    from speculor.api import SpeculativeDecoder
    from speculor.bench_report import print_table, summarize, write_outputs
    from speculor.prompts import load_prompt_set, render_prompt
    from speculor.threads import use_cpu_threads

    _check_arguments(args)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    threads = use_cpu_threads(args.threads, args.device)
    prompts = load_prompt_set(args.prompts, limit=args.num_prompts)
    loader = {"device": args.device, "dtype": args.dtype, "runner": args.runner, "kernels": args.kernels}
    loader["max_batch_size"] = max(args.batch_size)
    loader["threads"] = None if threads is None else threads.threads
    loader["tensor_parallel"] = args.tensor_parallel
    baseline_decoder = SpeculativeDecoder(args.target, **loader)
    # Under tensor parallelism every rank runs the same plans; rank 0 alone reports and writes.
    main_rank = baseline_decoder.tensor_parallel is None or baseline_decoder.tensor_parallel.is_main
    if not main_rank:
        quiet_rank()
    if baseline_decoder.tokenizer is None:
        raise SpeculorError(f"target {args.target!r} has no tokenizer, which the prompt sets need")
    prompt_ids = [baseline_decoder.encode(render_prompt(prompt, baseline_decoder.tokenizer)) for prompt in prompts]
    target_model = baseline_decoder.target.model
    loading = loader | {"device": baseline_decoder.device, "dtype": baseline_decoder.dtype}
    drafters = [
        Drafter(draft, ngram, SpeculativeDecoder(target_model, draft, ngram=ngram, **loading))
        for draft, ngram in [*((d, None) for d in args.draft), *((None, n) for n in args.ngram)]
    ]
    settings = BenchSettings(args.max_new_tokens, args.ignore_eos, args.seed, args.warmup)
    cost_ratios = {}
    if args.adaptive:
        cost_ratios = {d.draft: forward_cost_ratio(d.decoder, prompt_ids[0]) for d in drafters if d.draft is not None}
    plans = plan_configurations(args, baseline_decoder, drafters, cost_ratios)
    seconds_per_token = generation_pace(baseline_decoder, prompt_ids[0])
    if main_rank:
        console.print(escape(cost_text(plans, len(prompt_ids), settings, seconds_per_token)), soft_wrap=True)
    _, generations = planned_work(plans, len(prompt_ids), args.warmup)
    with tqdm(total=generations, desc="speculor bench", unit="gen", dynamic_ncols=True, disable=not main_rank) as bar:
        results, interrupted = run_plans(plans, prompt_ids, settings, bar)
    if interrupted and not results:
        if main_rank:
            console.print("interrupted before every configuration had finished a prompt: nothing to save")
        return 130
    baselines = {(r.config.temperature, r.config.batch_size): r for r in results if r.config.policy == "target"}
    rows = [summarize(result, baselines[result.config.temperature, result.config.batch_size]) for result in results]
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **source_revision(),
        "command": command_line(args),
        "target": args.target,
        "drafts": args.draft,
        "ngrams": args.ngram,
        "gammas": args.gamma,
        "batch_sizes": args.batch_size,
        "temperatures": args.temperature,
        "prompts": args.prompts,
        "num_prompts": len(prompt_ids),
        "prompt_ids": [prompt.id for prompt in prompts],
        "max_new_tokens": args.max_new_tokens,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "warmup": args.warmup,
        "leviathan_cost_ratios": cost_ratios,
        "runner": args.runner,
        "kernels": args.kernels,
        "runner_classes": sorted(
            {type(decoder.target_runner).__name__ for decoder in (baseline_decoder, *(d.decoder for d in drafters))}
        ),
        "device": str(baseline_decoder.device),
        "device_name": _device_name(baseline_decoder.device),
        "cpu_threads": None if threads is None else threads.threads,
        "cpu_threads_chosen": None if threads is None else threads.describe(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "interrupted": interrupted,
        "dtype": str(baseline_decoder.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if not main_rank:
        return 0
    out_dir = Path(args.out)
    best = write_outputs(out_dir, meta, results, rows)
    out = Console(highlight=False)
    print_table(rows, out)
    if interrupted:
        finished = finished_text(results, len(prompt_ids))
        out.print(f"interrupted: saved what every configuration finished, {finished}, to {out_dir}", soft_wrap=True)
    else:
        out.print(f"wrote results, plots, report.md and best_config.json to {out_dir}", soft_wrap=True)
    for choice in best["by_temperature"]:
        if choice["vllm_speculative_config"] is None:
            out.print(f"T={choice['temperature']:g}: nothing beat the target alone")
        else:
            drafter = choice.get("draft") or f"ngram {choice['ngram']}"
            speedup = choice["speedup_median"]
            out.print(
                f"T={choice['temperature']:g}: best is {drafter}, γ={choice['gamma']} ({speedup:.2f}x)", soft_wrap=True
            )
    return 130 if interrupted else 0
