"""The `speculor train-eagle` subcommand's options. Training lives in `speculor.train_eagle`, imported only when the
command runs, so the command line starts quickly (as `speculor.train_command` does for `train`)."""

from __future__ import annotations

import argparse

from speculor.threads import add_threads_argument, use_cpu_threads
from speculor.train_command import joined_command

# speculor.train_eagle's defaults, without importing torch.
DEFAULT_TTT_STEPS = 4
DEFAULT_DRAFT_VOCAB = 2048


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-eagle",
        help="train an EAGLE-3 draft head that reads a target's own hidden states",
        description="Train an EAGLE-3 head (one decoder layer over the target's hidden states from three layers) for "
        "any target that loads, on Python source as `speculor train` reads it, with the target's distribution as the "
        "teacher and EAGLE-3's training-time test. Saved in the hub layout vLLM and SGLang load, with a model card; "
        "`--draft DIR` detects it.",
    )
    parser.add_argument("--target", required=True, help="directory of the target model (with its tokenizer)")
    parser.add_argument("--output", required=True, help="directory to write the head into")
    parser.add_argument("--corpus", action="append", help="directory of .py files (default: stdlib + site-packages)")
    parser.add_argument("--max-corpus-bytes", type=int, help="use at most this many bytes of source")
    parser.add_argument("--seconds", type=float, default=600.0, help="training time (default 600)")
    parser.add_argument("--steps", type=int, help="train for this many steps instead of a time budget")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per step")
    parser.add_argument("--sequence-length", type=int, default=128, help="tokens per window")
    parser.add_argument(
        "--ttt-steps", type=int, default=DEFAULT_TTT_STEPS, help="drafting steps unrolled in training (default 4)"
    )
    parser.add_argument(
        "--draft-vocab", type=int, default=DEFAULT_DRAFT_VOCAB, help="tokens the head drafts from (default 2048)"
    )
    parser.add_argument(
        "--layers",
        type=_layer_list,
        help="the three target layers whose incoming hidden states feed the head, comma-separated (default: vLLM's "
        "and SGLang's 2,L/2,L-3 for a target of L layers); a shallow target may do better with later ones",
    )
    parser.add_argument(
        "--init-from",
        metavar="HEAD_DIR",
        help="go on training this saved head (its draft vocabulary and layers are kept): a hub head on your corpus",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_train_eagle)


def _layer_list(text: str) -> tuple[int, ...]:
    """`--layers 2,4,7` as a tuple of three layer indices."""
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated layer numbers, got {text!r}") from None
    if len(layers) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated layer numbers, got {text!r}")
    return layers


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, defaults spelled out."""
    words = ["speculor", "train-eagle", "--target", args.target, "--output", args.output]
    for directory in args.corpus or []:
        words += ["--corpus", directory]
    options = {
        "--max-corpus-bytes": args.max_corpus_bytes,
        "--seconds": None if args.steps else args.seconds,
        "--steps": args.steps,
        "--batch-size": args.batch_size,
        "--sequence-length": args.sequence_length,
        "--ttt-steps": args.ttt_steps,
        "--draft-vocab": args.draft_vocab,
        "--layers": ",".join(map(str, args.layers)) if args.layers else None,
        "--init-from": args.init_from,
        "--learning-rate": args.learning_rate,
        "--device": args.device,
        "--threads": args.threads,
        "--seed": args.seed,
    }
    return joined_command(words, options)


def run_train_eagle(args: argparse.Namespace) -> int:
    from speculor.train_eagle import train_eagle_head

    use_cpu_threads(args.threads, args.device)
    result = train_eagle_head(
        args.output,
        args.target,
        corpus=args.corpus,
        max_corpus_bytes=args.max_corpus_bytes,
        seconds=args.seconds,
        steps=args.steps,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        ttt_steps=args.ttt_steps,
        draft_vocab_size=args.draft_vocab,
        feature_layers=args.layers,
        init_from=args.init_from,
        learning_rate=args.learning_rate,
        device=args.device,
        seed=args.seed,
        command=_command_line(args),
        progress=not args.quiet,
    )
    by_position = " ".join(f"{value:.3f}" for value in result.acceptance_by_position)
    print(
        f"{result.output_dir}\t{result.steps} steps\theld-out greedy acceptance by draft position {by_position}\t"
        f"mean accepted length {result.mean_accepted_length:.2f}"
    )
    return 0
