"""`speculor bench`: measure drafts, γ and adaptive policies against the target alone, and recommend the best.

The target is loaded once: every drafter gets its own `SpeculativeDecoder` built on the already loaded target
model (each with its own runner and cache), so only the drafts are loaded per drafter. Every configuration runs
over the same prompts in the same order, with seed `--seed + prompt index`, after untimed warm-up generations.
Run order, per temperature: the target alone, then for each drafter its fixed γ values, then (with `--adaptive`)
the confidence-threshold and Leviathan policies, the latter given the cost ratio c measured on the fixed runs.
Adaptive policies apply to draft models only: prompt lookup has no draft probabilities to threshold, and its
near-zero cost would always make the Leviathan policy pick the largest γ.

The measuring happens here; `speculor.bench_report` turns the records into tables, plots and files.
"""

from __future__ import annotations

import argparse
import platform
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import transformers
from rich.console import Console
from tqdm import tqdm

from speculor.adaptive import ConfidenceThreshold, FixedGamma, GammaPolicy, LeviathanGamma
from speculor.api import SpeculativeDecoder
from speculor.bench_report import (
    BenchConfig,
    ConfigResult,
    PromptRun,
    measured_cost_ratio,
    print_table,
    summarize,
    write_outputs,
)
from speculor.errors import SpeculorError
from speculor.loading import DTYPES
from speculor.prompts import load_prompt_set, render_prompt
from speculor.runners import RUNNER_KINDS

DEFAULT_GAMMAS = (1, 2, 4, 6, 8)
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


class Bench:
    """Runs configurations over one list of prompts (as token ids), with a progress bar across all of them."""

    def __init__(self, prompt_ids: list[list[int]], settings: BenchSettings, progress: tqdm) -> None:
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.progress = progress

    def measure(
        self, decoder: SpeculativeDecoder, config: BenchConfig, make_policy: Callable[[], GammaPolicy]
    ) -> ConfigResult:
        """Warm up, then generate once per prompt; a fresh policy per generation so prompts do not interact."""
        self.progress.set_postfix_str(config.label)
        settings = self.settings
        options = {
            "max_new_tokens": settings.max_new_tokens,
            "temperature": config.temperature,
            "ignore_eos": settings.ignore_eos,
            "speculative": config.policy != "target",
        }
        for index in range(settings.warmup):
            decoder.generate(self.prompt_ids[index % len(self.prompt_ids)], gamma=make_policy(), seed=index, **options)
            self.progress.update()
        result = ConfigResult(config)
        for index, ids in enumerate(self.prompt_ids):
            counter = RejectionCounter(make_policy())
            generation = decoder.generate(ids, gamma=counter, seed=settings.seed + index, **options)
            result.runs.append(PromptRun(index, generation.stats.to_dict(), generation.token_ids, counter.rejections))
            self.progress.update()
        return result


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
    parser.add_argument("--runner", default="auto", choices=RUNNER_KINDS, help="model runner")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=1, help="untimed generations before each configuration")
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
    if args.adaptive:
        parts += ["--adaptive", "--confidence-threshold", f"{args.confidence_threshold:g}"]
    parts += ["--prompts", args.prompts, "--num-prompts", str(args.num_prompts)]
    parts += ["--max-new-tokens", str(args.max_new_tokens), "--ignore-eos" if args.ignore_eos else "--no-ignore-eos"]
    parts += ["--runner", args.runner, "--seed", str(args.seed), "--warmup", str(args.warmup)]
    parts += [f"--{name}={value}" for name, value in (("device", args.device), ("dtype", args.dtype)) if value]
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()}, {torch.get_num_threads()} torch threads"


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


def _configs_per_drafter(args: argparse.Namespace, drafter: Drafter) -> int:
    adaptive = 2 if args.adaptive and drafter.draft is not None else 0
    return len(args.gamma) + adaptive


def run_bench(args: argparse.Namespace) -> int:
    _check_arguments(args)
    prompts = load_prompt_set(args.prompts, limit=args.num_prompts)
    baseline_decoder = SpeculativeDecoder(args.target, device=args.device, dtype=args.dtype, runner=args.runner)
    if baseline_decoder.tokenizer is None:
        raise SpeculorError(f"target {args.target!r} has no tokenizer, which the prompt sets need")
    prompt_ids = [baseline_decoder.encode(render_prompt(prompt, baseline_decoder.tokenizer)) for prompt in prompts]
    target_model = baseline_decoder.target.model
    loading = {"device": baseline_decoder.device, "dtype": baseline_decoder.dtype, "runner": args.runner}
    drafters = [
        Drafter(draft, ngram, SpeculativeDecoder(target_model, draft, ngram=ngram, **loading))
        for draft, ngram in [*((d, None) for d in args.draft), *((None, n) for n in args.ngram)]
    ]
    settings = BenchSettings(args.max_new_tokens, args.ignore_eos, args.seed, args.warmup)
    configs_per_temperature = 1 + sum(_configs_per_drafter(args, drafter) for drafter in drafters)
    total = len(args.temperature) * configs_per_temperature * (len(prompt_ids) + args.warmup)
    with tqdm(total=total, desc="speculor bench", unit="gen", dynamic_ncols=True) as progress:
        bench = Bench(prompt_ids, settings, progress)
        results = _run_all(bench, args, baseline_decoder, drafters)
    baselines = {r.config.temperature: r for r in results if r.config.policy == "target"}
    rows = [summarize(result, baselines[result.config.temperature]) for result in results]
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(args),
        "target": args.target,
        "drafts": args.draft,
        "ngrams": args.ngram,
        "gammas": args.gamma,
        "temperatures": args.temperature,
        "prompts": args.prompts,
        "num_prompts": len(prompt_ids),
        "prompt_ids": [prompt.id for prompt in prompts],
        "max_new_tokens": args.max_new_tokens,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "warmup": args.warmup,
        "runner": args.runner,
        "runner_classes": sorted(
            {type(decoder.target_runner).__name__ for decoder in (baseline_decoder, *(d.decoder for d in drafters))}
        ),
        "device": str(baseline_decoder.device),
        "device_name": _device_name(baseline_decoder.device),
        "dtype": str(baseline_decoder.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    out_dir = Path(args.out)
    best = write_outputs(out_dir, meta, results, rows)
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    print_table(rows, console)
    console.print(f"wrote results, plots, report.md and best_config.json to {out_dir}")
    first = best["by_temperature"][0]
    if first["vllm_speculative_config"] is None:
        console.print(f"T={first['temperature']:g}: nothing beat the target alone")
    else:
        drafter = first.get("draft") or f"ngram {first['ngram']}"
        console.print(
            f"T={first['temperature']:g}: best is {drafter}, γ={first['gamma']} ({first['speedup_median']:.2f}x)"
        )
    return 0


def _run_all(
    bench: Bench,
    args: argparse.Namespace,
    baseline_decoder: SpeculativeDecoder,
    drafters: Sequence[Drafter],
) -> list[ConfigResult]:
    results = []
    for temperature in args.temperature:
        baseline = bench.measure(baseline_decoder, BenchConfig(temperature), partial(FixedGamma, 1))
        results.append(baseline)
        for drafter in drafters:
            draft, ngram, decoder = drafter.draft, drafter.ngram, drafter.decoder
            fixed = ConfigResult(BenchConfig(temperature, "fixed", draft, ngram))
            for gamma in args.gamma:
                config = BenchConfig(temperature, "fixed", draft, ngram, gamma)
                result = bench.measure(decoder, config, partial(FixedGamma, gamma))
                results.append(result)
                fixed.runs += result.runs
            if not args.adaptive or draft is None:
                continue
            top = max(args.gamma)
            config = BenchConfig(temperature, "confidence", draft, None, top)
            results.append(bench.measure(decoder, config, partial(ConfidenceThreshold, top, args.confidence_threshold)))
            cost = measured_cost_ratio(fixed, baseline) or 0.0
            config = BenchConfig(temperature, "leviathan", draft, None, top)
            results.append(bench.measure(decoder, config, partial(LeviathanGamma, top, cost_ratio=cost)))
    return results
