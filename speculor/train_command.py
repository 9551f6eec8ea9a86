"""The `speculor train` subcommand's options. Training itself lives in `speculor.train`, which imports torch,
tokenizers and transformers; it is imported only when the command runs, so the rest of the command line starts
quickly. The imports go one way: this module imports `speculor.train`, never the reverse. This module imports
nothing beyond the standard library, so `python -m speculor.train_command` runs the train command alone on a
machine that has only torch, transformers and tokenizers (speculor.threads needs nothing more)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Literal

from speculor.threads import add_threads_argument, use_cpu_threads

# The shapes of the shipped family (speculor/models), each trained for --seconds.
DEFAULT_FAMILY = ("target:8x384", "draft-4x128:4x128", "draft-3x128:3x128", "draft-1x192:1x192")
# speculor.train.DEFAULT_CPU_CORPUS_BYTES and DEFAULT_GPU_CORPUS_BYTES, spelled out without importing torch; shared
# with `train-parallel`, which reads the same corpus.
MAX_CORPUS_BYTES_HELP = (
    "use at most this many bytes of source; 0 for all of it (default: 8 MB on the CPU, 200 MB on a GPU; the whole "
    "default corpus is often hundreds of MB)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a tokenizer and a family of small Llama models (a target and drafts) on Python source",
        description="Train a byte-level BPE tokenizer and Llama models that share it, then save each model as a "
        "Hugging Face directory OUTPUT/NAME with a model card. The default corpus is this interpreter's own Python "
        "source.",
    )
    parser.add_argument("--output", required=True, help="directory to write the family into")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME:LAYERSxWIDTH[@SECONDS]",
        help=f"a model to train, in order (repeatable; default: {' '.join(DEFAULT_FAMILY)})",
    )
    parser.add_argument(
        "--corpus", action="append", help="directory of .py files (repeatable; default: stdlib + site-packages)"
    )
    parser.add_argument("--max-corpus-bytes", type=int, help=MAX_CORPUS_BYTES_HELP)
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokens in the BPE tokenizer")
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="wall-clock training time per model, stopping within one step of it (default 60); what it buys "
        "depends on the machine: the shipped family's budgets were set on a GPU",
    )
    parser.add_argument("--steps", type=int, help="train each model for this many steps instead of a time budget")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--sequence-length", type=int, default=1024, help="tokens per sequence, also the context")
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: by width)")
    parser.add_argument(
        "--distill-from",
        help="name of an earlier model that later ones learn to imitate, or the directory of a saved one (new drafts "
        "for an existing target; its tokenizer is reused)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds initialisation and the order of training windows")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_train)


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed options (defaults spelled out)."""
    words = ["speculor", "train", "--output", args.output]
    for shape in args.models or DEFAULT_FAMILY:
        words += ["--model", shape]
    for directory in args.corpus or []:
        words += ["--corpus", directory]
    options = {
        "--max-corpus-bytes": args.max_corpus_bytes,
        "--vocab-size": args.vocab_size,
        "--seconds": None if args.steps else args.seconds,
        "--steps": args.steps,
        "--batch-size": args.batch_size,
        "--sequence-length": args.sequence_length,
        "--learning-rate": args.learning_rate,
        "--distill-from": args.distill_from,
        "--device": args.device,
        "--threads": args.threads,
        "--seed": args.seed,
    }
    return joined_command(words, options)


def joined_command(words: list[str], options: dict[str, object]) -> str:
    """`words` followed by every option that has a value (floats in their shortest form), as one shell line."""
    for flag, value in options.items():
        if value is not None:
            words = [*words, flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def corpus_cap(max_corpus_bytes: int | None) -> int | Literal["auto"] | None:
    """--max-corpus-bytes as the training functions take it: left out is "auto" (the device's default cap), 0 is
    None (no cap)."""
    return "auto" if max_corpus_bytes is None else max_corpus_bytes or None


def run_train(args: argparse.Namespace) -> int:
    from speculor.train import train_family

    use_cpu_threads(args.threads, args.device)
    result = train_family(
        args.output,
        args.models or list(DEFAULT_FAMILY),
        corpus=args.corpus,
        max_corpus_bytes=corpus_cap(args.max_corpus_bytes),
        vocab_size=args.vocab_size,
        seconds=args.seconds,
        steps=args.steps,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        learning_rate=args.learning_rate,
        distill_from=args.distill_from,
        device=args.device,
        seed=args.seed,
        command=_command_line(args),
        progress=not args.quiet,
    )
    for trained in result.models.values():
        print(
            f"{trained.name}\t{trained.shape}\t{trained.parameters:,} params\t{trained.tokens_seen:,} tokens\t"
            f"held-out loss {trained.held_out_loss:.4f}\t{trained.path}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m speculor.train_command ...` runs the train command alone, so a machine that has only torch,
    transformers and tokenizers (a bare GPU box) needs none of the server's or the other commands' dependencies."""
    parser = argparse.ArgumentParser(prog="python -m speculor.train_command")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return run_train(args)


if __name__ == "__main__":
    sys.exit(main())
