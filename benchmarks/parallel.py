"""Sequential against parallel drafts, side by side in one run: one draft forward per token (`DraftModelProposer`)
or one per step (`ParallelDraftProposer`, PARD), at the same γ, on the same prompts and target.

    python benchmarks/parallel.py --device cpu --quick --out /tmp/parallel-smoke    # CPU smoke test, < 2 minutes
    python benchmarks/parallel.py --device cpu --parts shipped --batch-sizes 1 --out OUT   # the shipped family
    python benchmarks/parallel.py --device cuda --out OUT          # both parts, batch sizes 1..64 (the GPU default)

Parts (`--parts shipped,trained`):
  shipped  `speculor.models.shipped()`: the target, draft-4x128-long (sequential) and draft-4x128-parallel.
  trained  a pair trained inside the run with benchmarks/gpu.py's part c code (`gpu.train_pair`, fixed seed; a
           rerun with the same --family-dir reuses it), then its first draft made parallel with
           `speculor.train_parallel.train_parallel_draft` (distilled from the target, `--parallel-seconds`).
For each batch size B, the prompts run as one rolling batch of B rows (`max_batch_size=B`), greedy, `ignore_eos`:
the target alone, the sequential draft and the parallel draft at each γ of `--gammas`. Reported per run: TAR by
draft position, TAR, mean accepted length (tokens per target forward), draft forwards per target forward, tokens/s
(all generated tokens over the batch's wall time), the speedup over the target alone at the same B, and whether
the output equals the target alone's. JSON is written after each part, with the git commit it ran at.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from gpu import Family, Settings, shipped_family, train_pair

from speculor.api import SpeculativeDecoder
from speculor.engine import GenerationResult
from speculor.prompts import load_prompts
from speculor.provenance import source_revision

PARTS = ("shipped", "trained")


def summarize(results: Sequence[GenerationResult], seconds: float, reference: Sequence[GenerationResult] | None):
    """TAR by draft position and overall, tokens per target forward, draft forwards per target forward, tokens/s
    over the batch's wall time, and greedy identity with the target alone."""
    drafted_by: list[int] = []
    accepted_by: list[int] = []
    for result in results:
        for totals, counts in (
            (drafted_by, result.stats.drafted_by_position),
            (accepted_by, result.stats.accepted_by_position),
        ):
            totals.extend([0] * (len(counts) - len(totals)))
            for position, count in enumerate(counts):
                totals[position] += count
    accepted_by.extend([0] * (len(drafted_by) - len(accepted_by)))
    drafted = sum(result.stats.drafted for result in results)
    accepted = sum(result.stats.accepted for result in results)
    forwards = sum(result.stats.target_forwards for result in results)
    tokens = sum(len(result.token_ids) for result in results)
    summary = {
        "prompts": len(results),
        "tokens": tokens,
        "tar": accepted / drafted if drafted else None,
        "tar_by_position": [a / d if d else None for a, d in zip(accepted_by, drafted_by, strict=True)],
        "mean_accepted_length": tokens / forwards if forwards else None,
        "draft_forwards_per_target_forward": sum(r.stats.draft_forwards for r in results) / max(1, forwards),
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "seconds": seconds,
    }
    if reference is not None:
        summary["identical"] = sum(a.token_ids == b.token_ids for a, b in zip(results, reference, strict=True))
    return summary


def run_batch_of(decoder: SpeculativeDecoder, prompts: list[str], new_tokens: int, **options):
    """The prompts as one rolling batch; wall time includes everything but loading and warm-up."""
    if decoder.device.type == "cuda":
        torch.cuda.synchronize(decoder.device)
    began = time.perf_counter()
    results = decoder.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True, **options)
    if decoder.device.type == "cuda":
        torch.cuda.synchronize(decoder.device)
    return results, time.perf_counter() - began


def compare(family: Family, sequential: str, parallel: str, prompts: list[str], args, say) -> dict:
    """Target alone, sequential draft and parallel draft at every batch size and γ."""
    found: dict = {"target": family.target, "sequential": sequential, "parallel": parallel, "runs": {}}
    for batch in args.batch_sizes:
        decoders = {
            name: SpeculativeDecoder(
                family.target, draft, device=args.device, max_batch_size=batch, threads=args.threads
            )
            for name, draft in (("sequential", sequential), ("parallel", parallel))
        }
        for decoder in decoders.values():
            decoder.warm_up(max(args.gammas))
        # The target alone runs on the sequential decoder's target runner (the same runner for both baselines).
        alone, seconds = run_batch_of(decoders["sequential"], prompts, args.new_tokens, speculative=False)
        runs = {"target": summarize(alone, seconds, None)}
        for gamma in args.gammas:
            for name, decoder in decoders.items():
                results, seconds = run_batch_of(decoder, prompts, args.new_tokens, gamma=gamma)
                summary = summarize(results, seconds, alone)
                summary["speedup"] = (summary["tokens_per_second"] or 0) / runs["target"]["tokens_per_second"]
                runs[f"{name} γ={gamma}"] = summary
                say(
                    f"B={batch} {name} γ={gamma}: TAR {summary['tar']:.3f}, {summary['mean_accepted_length']:.2f} "
                    f"tokens/forward, {summary['speedup']:.2f}x, identical {summary['identical']}/{len(prompts)}"
                )
        found["runs"][f"batch {batch}"] = runs
    return found


def trained_family(args, say) -> tuple[Family, str, str]:
    """gpu.py part c's trained pair, and its first draft made parallel (reused when already there)."""
    from speculor.train_parallel import train_parallel_draft

    settings = Settings(
        quick=args.quick,
        device=torch.device(args.device),
        out=Path(args.out),
        family_dir=Path(args.family_dir) if args.family_dir else Path(args.out) / "family",
        train_seconds=args.train_seconds,
        draft_seconds=args.draft_seconds,
        max_corpus_bytes=args.max_corpus_bytes,
        compare_capture=False,
    )
    family = train_pair(settings)
    base_name, base = next(iter(family.drafts.items()))
    parallel = settings.family_dir / f"{base_name}-parallel"
    if not (parallel / "config.json").exists():
        train_parallel_draft(
            parallel,
            base,
            distill_from=family.target,
            max_gamma=max(6, *args.gammas),
            max_corpus_bytes=args.max_corpus_bytes,
            seconds=args.parallel_seconds,
            batch_size=4 if args.quick else 32,
            sequence_length=32 if args.quick else 256,
            cuts_per_window=8 if args.quick else 64,
            device=args.device,
            progress=False,
        )
        say(f"trained: {parallel.name} made from {base_name}")
    return family, base, os.fspath(parallel)


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="shipped,trained", help="comma-separated subset of shipped,trained")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test of every code path")
    parser.add_argument("--out", default="benchmarks/results/parallel", help="directory for parallel.json")
    parser.add_argument("--batch-sizes", help="comma-separated (default: 1,2,4,8,16,32,64 on GPU, 1 on CPU)")
    parser.add_argument("--gammas", default="4", help="comma-separated γ values (default 4)")
    parser.add_argument("--prompts", type=int, default=20, help="HumanEval prompts (default 20)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: speculor's choice)")
    parser.add_argument("--family-dir", help="trained part: where the pair is trained or found (default OUT/family)")
    parser.add_argument("--train-seconds", type=float, default=120.0, help="trained part: target training time")
    parser.add_argument("--draft-seconds", type=float, default=30.0, help="trained part: training time per draft")
    parser.add_argument("--parallel-seconds", type=float, default=60.0, help="trained part: parallel draft training")
    parser.add_argument("--max-corpus-bytes", type=int, default=64 << 20, help="trained part: corpus cap")
    args = parser.parse_args(argv)
    default_batches = "1,2,4,8,16,32,64" if args.device.startswith("cuda") else "1"
    args.batch_sizes = [int(size) for size in (args.batch_sizes or default_batches).split(",")]
    args.gammas = [int(gamma) for gamma in args.gammas.split(",")]
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if args.quick:
        args.prompts, args.new_tokens = min(args.prompts, 3), min(args.new_tokens, 12)
        args.batch_sizes = [size for size in args.batch_sizes if size <= 2] or [1]
        args.max_corpus_bytes, args.parallel_seconds = (
            min(args.max_corpus_bytes, 2 << 20),
            min(args.parallel_seconds, 5),
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        print(f"unknown parts {unknown}: choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    device = torch.device(args.device)
    report = {
        "date": datetime.date.today().isoformat(),
        "source": source_revision(),
        "command": shlex.join(["python", "benchmarks/parallel.py", *(sys.argv[1:] if argv is None else argv)]),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "settings": {key: value for key, value in vars(args).items() if key != "parts"},
        "parts": {},
    }
    prompts = load_prompts("humaneval", limit=args.prompts)
    for part in args.parts:
        if part == "shipped":
            family = shipped_family()
            from speculor.models import BEST_DRAFT, shipped

            sequential, parallel = (
                family.drafts[BEST_DRAFT],
                os.fspath(shipped().parallel_drafts["draft-4x128-parallel"]),
            )
        else:
            family, sequential, parallel = trained_family(args, say)
        report["parts"][part] = compare(family, sequential, parallel, prompts, args, say)
        (out / "parallel.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"{part}: written to {out / 'parallel.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
