"""The `speculor` command line. Each subcommand lives in its own module, which exposes `register(subparsers)`;
this file only wires them together and turns user mistakes into one clear line and a non-zero exit.

Building the parser imports no model code: torch, transformers and the server stack take seconds to import, so
every command module imports them inside its handler, and `speculor --help` or `speculor generate --help` answer at
once. Option choices that live in those modules are spelled out here (tests/test_cli.py checks they agree).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from speculor.errors import SpeculorError
from speculor.threads import ThreadChoice, add_threads_argument
from speculor.wording import counted

if TYPE_CHECKING:
    from speculor.api import SpeculativeDecoder
    from speculor.grammar import StructuredOutput

# Modules that add a subcommand through `register(subparsers)`.
COMMAND_MODULES = (
    "speculor.cli",
    "speculor.train_command",
    "speculor.train_parallel_command",
    "speculor.train_eagle_command",
    "speculor.demo",
    "speculor.bench",
    "speculor.server.command",
)
# speculor.loading.DTYPES, speculor.runners.RUNNER_KINDS and speculor.runners.fast.KERNEL_CHOICES, without torch.
DTYPE_CHOICES = ("bf16", "bfloat16", "float16", "float32", "float64", "fp16", "fp32", "fp64")
RUNNER_CHOICES = ("auto", "fast", "hf")
KERNEL_CHOICES = ("auto", "triton", "torch")
# speculor.api.DEFAULT_MAX_BATCH_SIZE: rows `generate --prompts-file` runs together unless --batch-size says otherwise.
DEFAULT_BATCH_SIZE = 8

console = Console(stderr=True, highlight=False)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's line with its default, so `--help` answers "what happens if I leave it out"
    (argparse's own ArgumentDefaultsHelpFormatter prints "(default: None)" and "(default: False)", which say nothing,
    and skips options without help text). Options whose help already names their default are left as written."""

    @staticmethod
    def _default_note(action: argparse.Action) -> str | None:
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
            return None
        if isinstance(default, (list, tuple)) and not default:
            return None  # a repeatable option given no times: "(default: )" would say nothing
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"(default: {shown.replace('%', '%%')})"

    def _format_action(self, action: argparse.Action) -> str:
        note = self._default_note(action)
        if action.help is None and note is not None:
            action = copy.copy(action)
            action.help = note
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        note = self._default_note(action)
        if note is None or "default" in text:
            return text
        return f"{text} {note}"


class SpeculorArgumentParser(argparse.ArgumentParser):
    """The parser of `speculor` and of each subcommand: defaults shown in every `--help`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def add_model_arguments(
    parser: argparse.ArgumentParser, *, target_required: bool = True, target_help: str = ""
) -> None:
    """Options shared by every command that loads a model pair; `target_help` adds to the --target help."""
    parser.add_argument(
        "--target", required=target_required, help=f"target model: local directory or hub id{target_help}"
    )
    drafting = parser.add_mutually_exclusive_group()
    drafting.add_argument("--draft", help="draft model: local directory or hub id")
    drafting.add_argument("--ngram", type=int, help="draft by prompt lookup, matching n-grams up to this size")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--runner", default="auto", choices=RUNNER_CHOICES, help="model runner")
    add_kernels_argument(parser)
    add_threads_argument(parser)
    add_tensor_parallel_argument(parser)


def add_tensor_parallel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        help="split the target over this many GPUs, one process each: launch with torchrun --nproc-per-node N -m "
        "speculor ...",
    )


def add_kernels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernels",
        choices=KERNEL_CHOICES,
        default="auto",
        help="the fast runner's small per-layer operations: fused Triton kernels (CUDA), plain torch, or auto",
    )


def quiet_rank() -> None:
    """A tensor-parallel rank other than 0 runs the same generation as rank 0, so printing it again would only
    repeat it: its standard output goes nowhere and the console shows errors only."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (held for the rest of the process)
    console.quiet = True


def quiet_weight_loading() -> None:
    """Turn off transformers' per-file weight-loading progress bars: the command line prints its own progress.
    transformers reads the setting from the environment when it is first imported, which a command line has not
    done yet; an in-process caller (a test) may already have imported it."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    else:
        transformers.utils.logging.disable_progress_bar()


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Generation options, named as in the Python API."""
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument(
        "--gamma", type=int, help="tokens drafted per step (default: chosen each step, learned from the steps)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, help="sample from the k likeliest tokens only (default: off)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set holding p (default: off)")
    parser.add_argument("--seed", type=int, help="same seed, same output (default: a fresh one)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="always generate exactly max-new-tokens")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below p × the likeliest's (default 0)")
    parser.add_argument(
        "--presence-penalty", type=float, default=0.0, help="subtract from every generated token's logit, in [-2, 2]"
    )
    parser.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="subtract per occurrence of a generated token, in [-2, 2]"
    )
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="divide seen tokens' positive logits by it (1 is off)"
    )
    parser.add_argument(
        "--logit-bias",
        action="append",
        default=None,
        metavar="ID=BIAS",
        help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)",
    )
    parser.add_argument("--min-tokens", type=int, default=0, help="no end of sequence before this many tokens")
    parser.add_argument(
        "--stop-token-id", type=int, action="append", default=None, help="end at this token id (repeatable)"
    )
    parser.add_argument("--bad-word", action="append", default=None, help="a word never generated (repeatable)")
    structure = parser.add_mutually_exclusive_group()
    structure.add_argument("--json-object", action="store_true", help="generate one JSON object")
    structure.add_argument("--json-schema", metavar="SCHEMA", help="generate JSON under this schema (JSON, or a file)")
    structure.add_argument("--regex", help="generate text that matches this regular expression")
    structure.add_argument("--choice", action="append", default=None, help="generate one of these (repeatable)")
    structure.add_argument("--grammar", metavar="FILE", help="generate under this EBNF grammar (rule root)")


def parse_token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise SpeculorError(f"--prompt-ids must be comma-separated integers, got {text!r}") from error


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate a completion, speculatively")
    add_model_arguments(parser, target_required=False, target_help=" (required unless --config names one)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    prompt.add_argument(
        "--prompts-file",
        help='many prompts, generated as a batch: JSON lines with a "prompt" field (text or token ids), or one prompt '
        "per line; prints one JSON line per prompt, in order",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"with --prompts-file: rows generated together (default {DEFAULT_BATCH_SIZE}); later prompts take the "
        "place of finished rows",
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--config",
        help="best_config.json written by `speculor bench`: its target (unless --target is given), and the draft and γ "
        "it chose for the temperature nearest --temperature (unless given here)",
    )
    parser.add_argument("--compare", action="store_true", help="also run the target alone and compare")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.add_argument(
        "--fixed-width",
        type=int,
        help="run every target step at this many tokens so verify and decode round alike (fast runner; γ < width)",
    )
    parser.set_defaults(handler=run_generate)


def generation_options(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "gamma": args.gamma,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "min_p": args.min_p,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "repetition_penalty": args.repetition_penalty,
        "logit_bias": parse_logit_bias(args.logit_bias or []),
        "min_tokens": args.min_tokens,
        "stop_token_ids": args.stop_token_id or [],
        "bad_words": args.bad_word or [],
        "structured": structure_option(args),
    }


def structure_option(args: argparse.Namespace) -> StructuredOutput | None:
    """The structure the output must follow (`speculor.grammar`), from --json-object, --json-schema (JSON text or a
    file holding it), --regex, --choice or --grammar; None without one."""
    from speculor.grammar import StructuredOutput  # imports torch, which the CLI loads only once it generates

    if args.json_object:
        return StructuredOutput.json_object()
    if args.json_schema is not None:
        path = Path(args.json_schema)
        return StructuredOutput.json_schema(path.read_text() if path.is_file() else args.json_schema)
    if args.regex is not None:
        return StructuredOutput.regex(args.regex)
    if args.choice:
        return StructuredOutput.choice(args.choice)
    if args.grammar is not None:
        try:
            return StructuredOutput.grammar(Path(args.grammar).read_text())
        except OSError as error:
            raise SpeculorError(f"--grammar: cannot read {args.grammar}: {error.strerror}") from None
    return None


def parse_logit_bias(entries: list[str]) -> dict[int, float]:
    """`--logit-bias ID=BIAS` entries as a mapping."""
    bias = {}
    for entry in entries:
        token, _, value = entry.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError as error:
            raise SpeculorError(f"--logit-bias takes ID=BIAS (an integer and a number), got {entry!r}") from error
    return bias


def config_choice(config: dict, temperature: float) -> dict:
    """The choice of a best_config.json for `temperature`: the entry of `by_temperature` measured nearest to it
    (a T = 0.8 run must not get the greedy pick), or the top-level choice of a file without that list."""
    choices = [choice for choice in config.get("by_temperature") or [] if isinstance(choice, dict)]
    if not choices:
        return config
    return min(choices, key=lambda choice: abs(float(choice.get("temperature", 0.0)) - temperature))


def apply_config_file(args: argparse.Namespace) -> str | None:
    """Fill target, draft/ngram and gamma from a best_config.json unless given on the command line, taking the
    choice measured at the temperature nearest to --temperature. Returns a one-line account of what was applied."""
    if not getattr(args, "config", None):
        return None
    try:
        with open(args.config) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise SpeculorError(f"cannot read config {args.config!r}: {error}") from error
    if not isinstance(config, dict):
        raise SpeculorError(f"config {args.config!r} must hold a JSON object")
    if args.target is None:
        args.target = config.get("target")
    choice = config_choice(config, getattr(args, "temperature", 0.0))
    if args.draft is None and args.ngram is None:
        args.draft = choice.get("draft")
        args.ngram = choice.get("ngram")
    if "gamma" in choice and args.gamma is None:
        args.gamma = choice["gamma"]
    drafter = args.draft or (f"ngram {args.ngram}" if args.ngram is not None else "none (target alone)")
    gamma = "load-aware" if args.gamma is None else args.gamma
    measured = f"the choice measured at T={float(choice['temperature']):g}" if "temperature" in choice else "its choice"
    return f"config {args.config}: {measured}: target {args.target}, draft {drafter}, γ {gamma}"


def read_prompts_file(path: str) -> list[str | list[int]]:
    """The prompts of `--prompts-file`: JSON lines, each an object with a "prompt" (text or a list of token ids),
    when the first non-blank line starts with "{"; otherwise one prompt per line, as written (blank lines skipped).
    A prompt spanning lines, such as code, needs the JSON form."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise SpeculorError(f"cannot read --prompts-file {path!r}: {error}") from error
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise SpeculorError(f"--prompts-file {path!r} holds no prompt")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts: list[str | list[int]] = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SpeculorError(f"{path}, line {number}: not a JSON object ({error.msg})") from error
        prompt = record.get("prompt") if isinstance(record, dict) else None
        ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not (isinstance(prompt, str) or ids):
            raise SpeculorError(f'{path}, line {number}: needs a "prompt" holding text or a list of token ids')
        prompts.append(prompt)
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    from speculor.api import SpeculativeDecoder
    from speculor.threads import use_cpu_threads

    applied = apply_config_file(args)
    if args.target is None:
        raise SpeculorError("give --target, or a --config file that names one")
    if applied is not None:
        console.print(f"[dim]{escape(applied)}[/dim]", soft_wrap=True)
    if args.batch_size is not None and args.prompts_file is None:
        raise SpeculorError("--batch-size applies to --prompts-file; a single prompt is one row")
    if args.batch_size is not None and args.batch_size < 1:
        raise SpeculorError(f"--batch-size must be at least 1, got {args.batch_size}")
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file is not None else None
    threads = use_cpu_threads(args.threads, args.device)
    decoder = SpeculativeDecoder(
        args.target,
        args.draft,
        ngram=args.ngram,
        device=args.device,
        dtype=args.dtype,
        runner=args.runner,
        fixed_width=args.fixed_width,
        kernels=args.kernels,
        max_batch_size=1 if prompts is None else args.batch_size or DEFAULT_BATCH_SIZE,
        threads=None if threads is None else threads.threads,
        tensor_parallel=args.tensor_parallel,
    )
    if decoder.tensor_parallel is not None and not decoder.tensor_parallel.is_main:
        quiet_rank()
    options = generation_options(args)
    if prompts is not None:
        return generate_batch(decoder, prompts, args, options, threads)
    prompt = parse_token_ids(args.prompt_ids) if args.prompt_ids is not None else args.prompt
    decoding = decoder.decoding(prompt, **options)
    out = Console(highlight=False)
    for delta in decoding:
        if not args.json:
            out.print(delta.text, end="", markup=False, soft_wrap=True)
    result = decoding.result
    assert result is not None
    stats = result.stats
    report: dict = {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "stats": stats.to_dict(),
    }
    report["cpu_threads"] = None if threads is None else threads.threads
    if args.compare:
        baseline = decoder.generate(prompt, speculative=False, **options)
        report["baseline"] = {
            "text": baseline.text,
            "token_ids": baseline.token_ids,
            "tokens_per_second": baseline.stats.tokens_per_second,
        }
        report["speedup"] = stats.tokens_per_second / max(baseline.stats.tokens_per_second, 1e-9)
        if args.temperature == 0:
            report["identical"] = baseline.token_ids == result.token_ids
    if args.json:
        print(json.dumps(report))
        return 0
    if result.text is None:
        out.print(" ".join(map(str, result.token_ids)))
    else:
        out.print()
    line = f"{counted(stats.new_tokens, 'token')}, {stats.tokens_per_second:.1f} tok/s, "
    if decoder.speculative:
        line += (
            f"TAR {stats.acceptance_rate:.3f}, mean accepted length {stats.mean_accepted_length:.2f}, "
            f"target forwards {stats.target_forwards}"
        )
    else:
        line += "target alone (no draft or --ngram: no speculation)"
    if args.compare:
        line += f", speedup {report['speedup']:.2f}x vs target alone"
        if "identical" in report:
            line += f", identical={report['identical']}"
    if threads is not None:
        line += f", {threads.describe()}"
    console.print(f"[dim]{line}[/dim]", soft_wrap=True)
    return 0


def generate_batch(
    decoder: SpeculativeDecoder,
    prompts: list[str | list[int]],
    args: argparse.Namespace,
    options: dict,
    threads: ThreadChoice | None,
) -> int:
    """`generate --prompts-file`: every prompt through one rolling batch, one JSON line per prompt in order, then a
    summary line (total tokens/s, what γ the steps drafted, and with --compare the target alone on the same batch)
    on stderr. Every step shape is prepared first, so the timing covers generation only."""
    decoder.warm_up(args.gamma)
    began = time.perf_counter()
    results = decoder.generate(prompts, **options)
    seconds = time.perf_counter() - began
    baselines = None
    if args.compare:
        began = time.perf_counter()
        baselines = decoder.generate(prompts, speculative=False, **options)
        baseline_seconds = time.perf_counter() - began
    gamma_steps: dict[int, int] = {}
    for index, result in enumerate(results):
        line = {
            "index": index,
            "text": result.text,
            "token_ids": result.token_ids,
            "finish_reason": result.finish_reason,
            "stats": result.stats.to_dict(),
        }
        for gamma, steps in result.stats.gamma_steps.items():
            gamma_steps[gamma] = gamma_steps.get(gamma, 0) + steps
        if baselines is not None:
            alone = baselines[index]
            line["baseline"] = {"text": alone.text, "token_ids": alone.token_ids}
            if args.temperature == 0:
                line["identical"] = alone.token_ids == result.token_ids
        print(json.dumps(line), flush=True)
    tokens = sum(result.stats.new_tokens for result in results)
    summary = (
        f"{counted(len(prompts), 'prompt')}, batch size {decoder.max_batch_size}: {counted(tokens, 'token')} in "
        f"{seconds:.2f} s, {tokens / seconds:.1f} tok/s total; "
        f"γ drafted per row step {dict(sorted(gamma_steps.items()))}"
    )
    if baselines is not None:
        alone_rate = sum(result.stats.new_tokens for result in baselines) / baseline_seconds
        summary += f"; target alone {alone_rate:.1f} tok/s, speedup {tokens / seconds / alone_rate:.2f}x"
        if args.temperature == 0:
            same = sum(alone.token_ids == result.token_ids for alone, result in zip(baselines, results, strict=True))
            summary += f", identical {same}/{len(prompts)}"
    if threads is not None:
        summary += f"; {threads.describe()}"
    console.print(f"[dim]{escape(summary)}[/dim]", soft_wrap=True)
    return 0


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), without importing anything heavy."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("speculor")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = SpeculorArgumentParser(prog="speculor", description="Lossless speculative decoding.")
    parser.add_argument("--version", action="version", version=f"speculor {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=SpeculorArgumentParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_weight_loading()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SpeculorError as error:
        console.quiet = False
        console.print(f"[bold red]error:[/bold red] {escape(str(error))}", markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
