"""Batched speculative decoding at the engine level: how speculation pays as the batch grows.

    python benchmarks/batch.py --out benchmarks/results/batch-h200                   # on cuda, ~3 min on an H200
    python benchmarks/batch.py --pair llama-8b --out OUT                            # 8B/1B shapes, random weights
    python benchmarks/batch.py --device cpu --batch-sizes 1,2,4 --out OUT            # the CPU goal (batch 4 vs 1)
    python benchmarks/batch.py --device cpu --quick --out /tmp/batch-smoke           # the same code, seconds

The shipped pair (`speculor.models.shipped()`: a 16M-parameter target and its best 1.8M draft, trained for real, so
acceptance is real) completes HumanEval prompts with forced-length generations (`ignore_eos`). For every batch size
B, in one run and side by side: the target alone (AR) through the same runner, speculation with a fixed γ, and the
load-aware γ policy (the default for batches); plus Hugging Face `generate` batched AR with left padding, the
ecosystem reference. Each configuration generates the same B prompts as one batch. Reported: total tokens/s,
tokens/s per row, ms per engine step, mean time to first token, what γ the policy chose, and (greedy) how many rows
equal the target alone's output token for token — in bf16 a row's rounding can depend on the batch and the step
width, so this is measured, not assumed. JSON is written after every batch size, so a cut run still leaves numbers.

`--pair llama-8b` runs the same on the Llama-3-8B / Llama-3.2-1B shapes with random bf16 weights and random 128-token
prompts: step costs at the scale the issue is about, where the random draft is (almost) never accepted, so the
load-aware policy should find γ = 0 and stay level with AR — the check that speculation never makes a batch slower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from speculor.api import SpeculativeDecoder
from speculor.models import shipped
from speculor.prompts import load_prompts
from speculor.provenance import source_revision
from speculor.threads import use_cpu_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--pair", default="shipped", choices=["shipped", "llama-8b"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on the cpu")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--gamma", type=int, default=4, help="the fixed γ compared with the load-aware policy")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: speculor's choice, speculor.threads)")
    parser.add_argument("--no-hf", action="store_true", help="skip Hugging Face generate")
    parser.add_argument("--quick", action="store_true", help="a smoke test: batch 1 and 2, 16 tokens, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.max_new_tokens, args.repeats = "1,2", 16, 1
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    return args


def timed_batch(decoder: SpeculativeDecoder, prompts: list[str], tokens: int, **options) -> dict:
    """Generate `prompts` as one batch; wall time, per-row figures and what the engine did."""
    if decoder.device.type == "cuda":
        torch.cuda.synchronize(decoder.device)
    began = time.perf_counter()
    results = decoder.generate(prompts, max_new_tokens=tokens, ignore_eos=True, **options)
    if decoder.device.type == "cuda":
        torch.cuda.synchronize(decoder.device)
    wall = time.perf_counter() - began
    steps = max(result.stats.target_forwards for result in results)
    gamma_steps: dict[int, int] = {}
    for result in results:
        for gamma, count in result.stats.gamma_steps.items():
            gamma_steps[gamma] = gamma_steps.get(gamma, 0) + count
    drafted = sum(result.stats.drafted for result in results)
    accepted = sum(result.stats.accepted for result in results)
    return {
        "wall_seconds": wall,
        "tokens_per_second": len(prompts) * tokens / wall,
        "tokens_per_second_per_row": statistics.mean(tokens / r.stats.wall_seconds for r in results),
        "ms_per_step": 1000 * wall / steps,
        "steps": steps,
        "time_to_first_token": statistics.mean(r.stats.time_to_first_token for r in results),
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_accepted_length": sum(r.stats.new_tokens for r in results)
        / sum(r.stats.target_forwards for r in results),
        "gamma_steps": dict(sorted(gamma_steps.items())),
        "token_ids": [r.token_ids for r in results],
    }


def hf_batched_generate(decoder: SpeculativeDecoder, prompts: list, tokens: int) -> dict:
    """Hugging Face `generate`, greedy, the batch left-padded, exactly `tokens` new tokens per row."""
    model = decoder.target.model
    if isinstance(prompts[0], str):
        tokenizer = decoder.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        inputs = dict(tokenizer(prompts, return_tensors="pt", padding=True).to(decoder.device))
        pad = tokenizer.pad_token_id
    else:
        inputs = {"input_ids": torch.tensor(prompts, device=decoder.device)}
        pad = 0
    if decoder.device.type == "cuda":
        torch.cuda.synchronize(decoder.device)
    began = time.perf_counter()
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    if decoder.device.type == "cuda":
        torch.cuda.synchronize(decoder.device)
    wall = time.perf_counter() - began
    return {"wall_seconds": wall, "tokens_per_second": len(prompts) * tokens / wall}


def load_pair(args: argparse.Namespace, batch_size: int) -> tuple[SpeculativeDecoder, list, dict]:
    """The decoder, the prompt pool and a description of the pair."""
    if args.pair == "shipped":
        family = shipped()
        decoder = SpeculativeDecoder(
            str(family.target), str(family.best_draft), device=args.device, dtype=args.dtype, max_batch_size=batch_size
        )
        return decoder, load_prompts("humaneval"), {"target": str(family.target), "draft": str(family.best_draft)}
    from gpu import llama_shapes, random_model

    shapes = llama_shapes(args.quick)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = random_model(shapes["llama-3-8b"], device, dtype)
    draft = random_model(shapes["llama-3.2-1b"], device, dtype)
    decoder = SpeculativeDecoder(target, draft, device=device, dtype=dtype, max_batch_size=batch_size)
    generator = torch.Generator().manual_seed(0)
    vocab = shapes["llama-3-8b"].vocab_size
    prompts = torch.randint(vocab, (max(args.batch_sizes), 128), generator=generator).tolist()
    return decoder, prompts, {"target": "llama-3-8b shape, random", "draft": "llama-3.2-1b shape, random"}


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (its token ids and counters stay consistent with its timing)."""
    return sorted(runs, key=lambda run: run["wall_seconds"])[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_cpu_threads(args.threads, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    decoder, prompts, pair = load_pair(args, max(args.batch_sizes))
    began = time.perf_counter()
    decoder.warm_up(args.gamma)
    warm_up_seconds = time.perf_counter() - began
    report = {
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **source_revision(),
        "device": torch.cuda.get_device_name(decoder.device) if decoder.device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "dtype": str(decoder.dtype),
        "pair": pair,
        "max_new_tokens": args.max_new_tokens,
        "fixed_gamma": args.gamma,
        "warm_up_seconds": warm_up_seconds,
        "batches": [],
    }
    out_file = args.out / "batch.json"
    configurations = {"ar": {"speculative": False}, "fixed": {"gamma": args.gamma}, "adaptive": {}}
    for size in args.batch_sizes:
        batch = [prompts[index % len(prompts)] for index in range(size)]
        entry: dict = {"batch_size": size}
        for name, options in configurations.items():
            # One untimed run first: a new prompt length or attention span can capture a graph or compile a kernel.
            timed_batch(decoder, batch, args.max_new_tokens, **options)
            runs = [timed_batch(decoder, batch, args.max_new_tokens, **options) for _ in range(args.repeats)]
            entry[name] = median_run(runs)
        reference = entry["ar"].pop("token_ids")
        for name in ("fixed", "adaptive"):
            ids = entry[name].pop("token_ids")
            entry[name]["identical_rows"] = sum(a == b for a, b in zip(ids, reference, strict=True))
            entry[name]["speedup_vs_ar"] = entry[name]["tokens_per_second"] / entry["ar"]["tokens_per_second"]
        if not args.no_hf:
            # One timed run (Hugging Face is the slow reference here), after one short untimed call in the process.
            if size == args.batch_sizes[0]:
                hf_batched_generate(decoder, batch, 4)
            entry["hf_generate"] = hf_batched_generate(decoder, batch, args.max_new_tokens)
        report["batches"].append(entry)
        out_file.write_text(json.dumps(report, indent=2) + "\n")
        print(table_row(entry), flush=True)
    first = report["batches"][0]["ar"]["tokens_per_second"]
    for entry in report["batches"]:
        entry["ar"]["vs_batch_1"] = entry["ar"]["tokens_per_second"] / first
    out_file.write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "batch.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def table_row(entry: dict) -> str:
    parts = [f"B={entry['batch_size']:>3}"]
    for name in ("ar", "fixed", "adaptive", "hf_generate"):
        if name in entry:
            parts.append(f"{name} {entry[name]['tokens_per_second']:8.1f} tok/s")
    parts.append(f"adaptive γ steps {entry['adaptive']['gamma_steps']}")
    return " | ".join(parts)


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}` — {report['device']}, {report['dtype']}, {report['date']}",
        "",
        "| B | AR tok/s | AR vs B=1 | fixed γ tok/s (x AR) | adaptive tok/s (x AR) | adaptive γ: steps | per-row tok/s "
        "AR / adaptive | ms/step AR / adaptive | TTFT ms AR / adaptive | identical rows fixed / adaptive | HF generate "
        "tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["batches"]:
        ar, fixed, adaptive = entry["ar"], entry["fixed"], entry["adaptive"]
        hf = entry.get("hf_generate", {}).get("tokens_per_second")
        lines.append(
            f"| {entry['batch_size']} | {ar['tokens_per_second']:.0f} | {ar.get('vs_batch_1', 1):.2f}x "
            f"| {fixed['tokens_per_second']:.0f} ({fixed['speedup_vs_ar']:.2f}x) "
            f"| {adaptive['tokens_per_second']:.0f} ({adaptive['speedup_vs_ar']:.2f}x) | {adaptive['gamma_steps']} "
            f"| {ar['tokens_per_second_per_row']:.0f} / {adaptive['tokens_per_second_per_row']:.0f} "
            f"| {ar['ms_per_step']:.2f} / {adaptive['ms_per_step']:.2f} "
            f"| {1000 * ar['time_to_first_token']:.1f} / {1000 * adaptive['time_to_first_token']:.1f} "
            f"| {fixed['identical_rows']}/{entry['batch_size']} / {adaptive['identical_rows']}/{entry['batch_size']} "
            f"| {f'{hf:.0f}' if hf else '—'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
