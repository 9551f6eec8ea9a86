"""The `speculor train-parallel` subcommand's options. Training lives in `speculor.train_parallel`, imported only
when the command runs, so the command line starts quickly (as `speculor.train_command` does for `train`)."""

from __future__ import annotations

import argparse

from speculor.threads import add_threads_argument, use_cpu_threads
from speculor.train_command import MAX_CORPUS_BYTES_HELP, corpus_cap, joined_command
from speculor.wording import counted

DEFAULT_MAX_GAMMA = 6  # speculor.train_parallel.DEFAULT_MAX_GAMMA: the largest γ the load-aware policy picks


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-parallel",
        help="adapt a trained draft into a parallel draft that proposes K tokens in one forward",
        description="Add a mask token to a trained draft and train it to predict the K next tokens from its context "
        "followed by K - 1 masks (PARD), distilling from the target when --distill-from names it. The result is "
        "detected as a parallel draft by `speculor generate/serve --draft`.",
    )
    parser.add_argument("--output", required=True, help="directory to write the parallel draft into")
    parser.add_argument("--init-from", required=True, help="directory of the trained draft to start from")
    parser.add_argument("--distill-from", help="directory of the target to learn from (default: corpus tokens)")
    parser.add_argument("--parallel", type=int, default=DEFAULT_MAX_GAMMA, help="K, tokens per forward (default 6)")
    parser.add_argument("--corpus", action="append", help="directory of .py files (default: stdlib + site-packages)")
    parser.add_argument("--max-corpus-bytes", type=int, help=MAX_CORPUS_BYTES_HELP)
    parser.add_argument("--seconds", type=float, default=600.0, help="training time (default 600)")
    parser.add_argument("--steps", type=int, help="train for this many steps instead of a time budget")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step")
    parser.add_argument("--sequence-length", type=int, default=256, help="tokens per window")
    parser.add_argument("--cuts", type=int, default=32, help="cut points (blocks of K - 1 masks) per window")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_train_parallel)


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, defaults spelled out."""
    words = ["speculor", "train-parallel", "--output", args.output, "--init-from", args.init_from]
    for directory in args.corpus or []:
        words += ["--corpus", directory]
    options = {
        "--distill-from": args.distill_from,
        "--parallel": args.parallel,
        "--max-corpus-bytes": args.max_corpus_bytes,
        "--seconds": None if args.steps else args.seconds,
        "--steps": args.steps,
        "--batch-size": args.batch_size,
        "--sequence-length": args.sequence_length,
        "--cuts": args.cuts,
        "--learning-rate": args.learning_rate,
        "--device": args.device,
        "--threads": args.threads,
        "--seed": args.seed,
    }
    return joined_command(words, options)


def run_train_parallel(args: argparse.Namespace) -> int:
    from speculor.train_parallel import train_parallel_draft

    use_cpu_threads(args.threads, args.device)
    result = train_parallel_draft(
        args.output,
        args.init_from,
        distill_from=args.distill_from,
        max_gamma=args.parallel,
        corpus=args.corpus,
        max_corpus_bytes=corpus_cap(args.max_corpus_bytes),
        seconds=args.seconds,
        steps=args.steps,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        cuts_per_window=args.cuts,
        learning_rate=args.learning_rate,
        device=args.device,
        seed=args.seed,
        command=_command_line(args),
        progress=not args.quiet,
    )
    by_offset = " ".join(f"{value:.3f}" for value in result.held_out_accuracy_by_offset)
    print(f"{result.output_dir}\t{counted(result.steps, 'step')}\theld-out top-1 by offset {by_offset}")
    return 0
