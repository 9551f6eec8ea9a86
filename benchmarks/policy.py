"""The default γ (the load-aware policy) against every fixed γ and the target alone, batch 1…64, in one run.

    python benchmarks/policy.py --pair trained --out OUT          # on cuda: trains part c's pair first (~4 min)
    python benchmarks/policy.py --pair shipped --out OUT          # the shipped family's target and best draft
    python benchmarks/policy.py --device cpu --quick --out /tmp/policy-smoke

For every batch size B, side by side on the same B prompts (HumanEval headers, forced length with `ignore_eos`):
the target alone (AR) through the same runner, speculation with each fixed γ in `--gammas`, and the default. Every
configuration runs once untimed, then `--repeats` times; the median run is kept. Reported per B: tokens/s of each,
the default's ratio to the best fixed γ and to AR (goals: ≥ 0.97x and ≥ 0.98x), the γ it drafted and the mean
time to the first token. The default's policy is the decoder's own and keeps learning across runs and batch sizes, as
it does in a server. JSON is written after every batch size, with the commit it ran.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from batch import median_run, timed_batch

from speculor.api import SpeculativeDecoder
from speculor.models import shipped
from speculor.prompts import load_prompts
from speculor.provenance import measurement_header
from speculor.threads import use_cpu_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pair", default="shipped", choices=["shipped", "trained"])
    parser.add_argument("--target", help="a target directory (with --draft): the pair to measure, trained elsewhere")
    parser.add_argument("--draft", help="a draft directory for --target")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--gammas", default="1,2,3,4,5,6", help="the fixed γ values compared with the default")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target-seconds", type=float, default=150, help="training budget of the trained target")
    parser.add_argument("--draft-seconds", type=float, default=40, help="training budget of the trained draft")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speculor's choice)")
    parser.add_argument("--commit", help="the commit being measured, where the checkout has no git metadata")
    parser.add_argument("--quick", action="store_true", help="a smoke test: batch 1 and 2, γ 1 and 3, 12 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.gammas, args.max_new_tokens, args.repeats = "1,2", "1,3", 12, 1
        args.target_seconds, args.draft_seconds = 4, 2
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    args.gammas = [int(gamma) for gamma in args.gammas.split(",")]
    return args


def train_pair(args: argparse.Namespace) -> dict[str, str]:
    """Part c's pair, trained here: a 32×576 target (~130M parameters) and a 4×256 draft distilled from it."""
    from speculor.train import train_family

    directory = args.out / "family"
    shapes = [f"target:32x576@{args.target_seconds:g}", f"draft:4x256@{args.draft_seconds:g}"]
    if args.quick:
        shapes = [f"target:2x64@{args.target_seconds:g}", f"draft:1x32@{args.draft_seconds:g}"]
    train_family(
        directory,
        shapes,
        max_corpus_bytes=8 << 20 if args.quick else 32 << 20,
        sequence_length=256 if args.quick else 1024,
        device=torch.device(args.device),
        seed=0,
        progress=False,
        distill_from="target",
    )
    return {"target": str(directory / "target"), "draft": str(directory / "draft")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_cpu_threads(args.threads, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    if args.target and args.draft:
        pair = {"target": args.target, "draft": args.draft}
    elif args.pair == "trained":
        pair = train_pair(args)
    else:
        family = shipped()
        pair = {"target": str(family.target), "draft": str(family.best_draft)}
    train_seconds = time.perf_counter() - began
    size = max(args.batch_sizes)
    decoder = SpeculativeDecoder(pair["target"], pair["draft"], device=args.device, max_batch_size=size)
    decoder.warm_up(max(args.gammas))
    prompts = load_prompts("humaneval")
    report = {
        **measurement_header(decoder.device, args.commit),
        "dtype": str(decoder.dtype),
        "pair": pair,
        "train_seconds": train_seconds,
        "max_new_tokens": args.max_new_tokens,
        "batches": [],
    }
    configurations: dict[str, dict] = {"ar": {"speculative": False}}
    configurations.update({f"gamma_{gamma}": {"gamma": gamma} for gamma in args.gammas})
    configurations["default"] = {}
    out_file = args.out / "policy.json"
    for size in args.batch_sizes:
        batch = [prompts[index % len(prompts)] for index in range(size)]
        entry: dict = {"batch_size": size}
        for name, options in configurations.items():
            timed_batch(decoder, batch, args.max_new_tokens, **options)
            runs = [timed_batch(decoder, batch, args.max_new_tokens, **options) for _ in range(args.repeats)]
            entry[name] = median_run(runs)
            entry[name].pop("token_ids")
        fixed = {name: entry[name]["tokens_per_second"] for name in configurations if name.startswith("gamma_")}
        best = max(fixed, key=fixed.__getitem__)
        default = entry["default"]["tokens_per_second"]
        entry["best_fixed"] = best
        entry["default_vs_best_fixed"] = default / fixed[best]
        entry["default_vs_ar"] = default / entry["ar"]["tokens_per_second"]
        entry["best_fixed_vs_ar"] = fixed[best] / entry["ar"]["tokens_per_second"]
        report["batches"].append(entry)
        report["policy"] = decoder._load_aware().snapshot()
        out_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(
            f"B={size:>3} AR {entry['ar']['tokens_per_second']:8.1f} tok/s | best fixed {best} "
            f"{entry['best_fixed_vs_ar']:.2f}x AR | default {entry['default_vs_ar']:.2f}x AR, "
            f"{entry['default_vs_best_fixed']:.2f}x best fixed, γ steps {entry['default']['gamma_steps']} | TTFT ms "
            f"AR {1000 * entry['ar']['time_to_first_token']:.1f} default "
            f"{1000 * entry['default']['time_to_first_token']:.1f}",
            flush=True,
        )
    (args.out / "policy.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    names = [name for name in report["batches"][0] if name.startswith("gamma_")]
    header = " | ".join(f"γ={name.split('_')[1]}" for name in names)
    lines = [
        f"`{report['command']}` — {report['device']}, {report['dtype']}, {report['date']}, commit {report['commit']}",
        "",
        f"| B | AR tok/s | {header} (x AR) | default tok/s | default / best fixed | default / AR | default γ: steps |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|",
    ]
    for entry in report["batches"]:
        ar = entry["ar"]["tokens_per_second"]
        fixed = " | ".join(f"{entry[name]['tokens_per_second'] / ar:.2f}x" for name in names)
        lines.append(
            f"| {entry['batch_size']} | {ar:.0f} | {fixed} | {entry['default']['tokens_per_second']:.0f} "
            f"| {entry['default_vs_best_fixed']:.2f} | {entry['default_vs_ar']:.2f} "
            f"| {entry['default']['gamma_steps']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
