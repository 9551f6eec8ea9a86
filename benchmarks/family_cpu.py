"""Measure the shipped family on the CPU: held-out loss (from the model cards), greedy acceptance (TAR) and mean
accepted length of every draft on the HumanEval prompts, tokens per second of the target alone against speculative
decoding with each draft, and Hugging Face assisted generation on the same pair and prompts.

    python benchmarks/family_cpu.py --output out/family_cpu.json

Runs take turns prompt by prompt (target alone, then each draft), so a shared machine's changing load falls on all
of them alike; the load average is recorded before and after. TAR and mean accepted length do not depend on the
machine; tokens per second do. Step costs (one target forward of 1 and γ+1 tokens, one draft forward) are measured
too, because on a CPU they decide the speedup: verifying γ+1 tokens costs more than one, unlike on a GPU.

    python benchmarks/family_cpu.py --tar-only --output benchmarks/results/family-cpu-DATE/family_cpu.json

measures only what does not depend on the machine (TAR, mean accepted length, identity with the target alone), so
it can run on a busy machine; the timing parts (step costs, γ sweep, Hugging Face) are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from speculor import SpeculativeDecoder
from speculor.models import shipped
from speculor.prompts import load_prompts
from speculor.provenance import source_revision
from speculor.runners import make_runner

HELD_OUT_ROW = re.compile(r"\| held-out loss \| ([0-9.]+) ")


def held_out_losses(paths: dict[str, Path]) -> dict[str, float]:
    losses = {}
    for name, path in paths.items():
        match = HELD_OUT_ROW.search((path / "README.md").read_text())
        if match:
            losses[name] = float(match.group(1))
    return losses


def step_costs(paths: dict[str, Path], gamma: int, repeats: int = 50) -> dict[str, dict[str, float]]:
    """Median milliseconds of one cached forward of k tokens after a 200-token prefix, per model and k."""
    costs = {}
    ids = torch.randint(0, 8192, (256,), generator=torch.Generator().manual_seed(0))
    for name, path in paths.items():
        runner = make_runner(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), "auto")
        costs[name] = {}
        for count in (1, gamma + 1):
            runner.reset(0)
            runner.extend(0, ids[:200])
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                runner.step([0], ids[200 : 200 + count][None])
                times.append(time.perf_counter() - began)
                runner.rollback(0, 200)
            costs[name][f"k={count}"] = 1e3 * statistics.median(times)
    return costs


def run_speculor(prompts: list[str], family, gamma: int, max_new_tokens: int) -> tuple[dict, dict]:
    """Every prompt with the target alone and with each draft, in turns. Returns per-mode summaries and samples."""
    decoders = {name: SpeculativeDecoder(family.target, path, device="cpu") for name, path in family.drafts.items()}
    alone_decoder = next(iter(decoders.values()))
    records: dict[str, list] = {"target alone": [], **{name: [] for name in decoders}}
    samples = []
    for index, prompt in enumerate(prompts):
        options = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
        alone = alone_decoder.generate(prompt, speculative=False, **options)
        records["target alone"].append((alone, True))
        for name, decoder in decoders.items():
            result = decoder.generate(prompt, gamma=gamma, **options)
            records[name].append((result, result.token_ids == alone.token_ids))
        if index < 3:
            samples.append({"prompt": prompt, "completion": alone.text})
        print(f"prompt {index + 1}/{len(prompts)}", flush=True)
    summary = {}
    for name, results in records.items():
        stats = [result.stats for result, _ in results]
        drafted = sum(s.drafted for s in stats)
        summary[name] = {
            "prompts": len(stats),
            "accepted": sum(s.accepted for s in stats),
            "drafted": drafted,
            "tar": sum(s.accepted for s in stats) / drafted if drafted else None,
            "mean_accepted_length": sum(s.new_tokens for s in stats) / sum(s.target_forwards for s in stats),
            "median_tokens_per_second": statistics.median(s.tokens_per_second for s in stats),
            "total_tokens_per_second": sum(s.new_tokens for s in stats) / sum(s.wall_seconds for s in stats),
            "draft_seconds": sum(s.draft_seconds for s in stats),
            "verify_seconds": sum(s.verify_seconds for s in stats),
            "other_seconds": sum(s.other_seconds for s in stats),
            "identical_to_target_alone": sum(same for _, same in results),
        }
    return summary, {"completions": samples}


def run_gamma_sweep(prompts: list[str], family, gammas: list[int], max_new_tokens: int) -> dict:
    """The best draft at several γ, target alone taking turns with them."""
    decoder = SpeculativeDecoder(family.target, family.best_draft, device="cpu")
    rates: dict[str, list[float]] = {"target alone": [], **{f"γ={gamma}": [] for gamma in gammas}}
    accepted = {gamma: [0, 0] for gamma in gammas}
    for prompt in prompts:
        options = {"max_new_tokens": max_new_tokens, "ignore_eos": True}
        rates["target alone"].append(decoder.generate(prompt, speculative=False, **options).stats.tokens_per_second)
        for gamma in gammas:
            stats = decoder.generate(prompt, gamma=gamma, **options).stats
            rates[f"γ={gamma}"].append(stats.tokens_per_second)
            accepted[gamma][0] += stats.accepted
            accepted[gamma][1] += stats.drafted
    result = {name: {"median_tokens_per_second": statistics.median(values)} for name, values in rates.items()}
    for gamma, (hits, drafted) in accepted.items():
        result[f"γ={gamma}"]["tar"] = hits / drafted
    return result


def run_hugging_face(prompts: list[str], family, gamma: int, max_new_tokens: int) -> dict:
    """`generate` alone and assisted by the best draft (γ constant, and transformers' default heuristic schedule)."""
    tokenizer = AutoTokenizer.from_pretrained(family.target)
    target = AutoModelForCausalLM.from_pretrained(family.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(family.best_draft, dtype=torch.float32).eval()
    modes = {
        "HF generate": {},
        f"HF assisted, {gamma} tokens constant": {
            "assistant_model": draft,
            "num_assistant_tokens": gamma,
            "num_assistant_tokens_schedule": "constant",
            "assistant_confidence_threshold": 0.0,
        },
        "HF assisted, default schedule": {"assistant_model": draft},
    }
    rates: dict[str, list[float]] = {name: [] for name in modes}
    identical = dict.fromkeys(modes, 0)
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        reference = None
        for name, extra in modes.items():
            began = time.perf_counter()
            with torch.inference_mode():
                output = target.generate(
                    **inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **extra
                )
            seconds = time.perf_counter() - began
            new = output[0, inputs["input_ids"].shape[1] :].tolist()
            reference = new if reference is None else reference
            identical[name] += new == reference
            rates[name].append(len(new) / seconds)
    return {
        name: {"median_tokens_per_second": statistics.median(values), "identical_to_generate": identical[name]}
        for name, values in rates.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="out/family_cpu.json")
    parser.add_argument("--limit", type=int, help="use only the first N HumanEval prompts (default: all 164)")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see the demo)")
    parser.add_argument("--hf-every", type=int, default=4, help="Hugging Face runs on every k-th prompt")
    parser.add_argument("--sweep-limit", type=int, default=40, help="prompts for the γ sweep (0 skips it)")
    parser.add_argument("--sweep-gammas", default="2,3,4,5,6")
    parser.add_argument(
        "--tar-only", action="store_true", help="skip the timing parts (step costs, γ sweep, Hugging Face)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    family = shipped()
    prompts = load_prompts("humaneval", limit=args.limit)
    models = {"target": family.target, **family.drafts}
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        **source_revision(),
        "command": shlex.join(["python", "benchmarks/family_cpu.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average_before": os.getloadavg(),
        "prompts": len(prompts),
        "gamma": args.gamma,
        "max_new_tokens": args.max_new_tokens,
        "held_out_loss": held_out_losses(models),
    }
    if not args.tar_only:
        report["step_ms"] = step_costs(models, args.gamma)
    print(json.dumps(report, indent=1), flush=True)
    report["speculor"], report["samples"] = run_speculor(prompts, family, args.gamma, args.max_new_tokens)
    print(json.dumps(report["speculor"], indent=1), flush=True)
    if args.sweep_limit and not args.tar_only:
        gammas = [int(value) for value in args.sweep_gammas.split(",")]
        report["gamma_sweep"] = run_gamma_sweep(prompts[: args.sweep_limit], family, gammas, args.max_new_tokens)
        report["gamma_sweep_prompts"] = min(args.sweep_limit, len(prompts))
        print(json.dumps(report["gamma_sweep"], indent=1), flush=True)
    if not args.tar_only:
        hf_prompts = prompts[:: args.hf_every]
        report["hugging_face_prompts"] = len(hf_prompts)
        report["hugging_face"] = run_hugging_face(hf_prompts, family, args.gamma, args.max_new_tokens)
        print(json.dumps(report["hugging_face"], indent=1), flush=True)
    report["load_average_after"] = os.getloadavg()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
