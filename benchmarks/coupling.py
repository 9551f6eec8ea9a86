"""What seeded reproducibility costs: drafter-invariant coupling against the rejection rule, per temperature.

    python benchmarks/coupling.py --out OUT                                  # shipped pair, CPU or GPU
    python benchmarks/coupling.py --target T --draft D --out OUT
    python benchmarks/coupling.py --quick --out /tmp/coupling-smoke

A seeded request is verified by coupling by default (`reproducible=True`): the draft proposes with the target's own
noise and a draft is kept only if it equals the token the target samples, so the output is the target alone's
sample for that seed whatever the draft, γ or batch. The rejection rule of Leviathan et al. accepts more (it keeps a
draft with probability min(1, p/q)) but its tokens depend on what was drafted. Both are lossless in distribution.
For each temperature, the same prompts and seeds with a fixed γ: token acceptance rate (TAR) and mean accepted
length (tokens per target forward) of each rule. Accuracy, not speed: any machine load gives the same numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from speculor.api import SpeculativeDecoder
from speculor.models import shipped
from speculor.prompts import load_prompts
from speculor.provenance import measurement_header


def measure(decoder: SpeculativeDecoder, prompts: list, temperature: float, gamma: int, tokens: int, coupled: bool):
    drafted = accepted = emitted = forwards = 0
    for index, prompt in enumerate(prompts):
        result = decoder.generate(
            prompt,
            max_new_tokens=tokens,
            gamma=gamma,
            temperature=temperature,
            seed=index,
            ignore_eos=True,
            reproducible=coupled,
        )
        drafted += result.stats.drafted
        accepted += result.stats.accepted
        emitted += result.stats.new_tokens
        forwards += result.stats.target_forwards
    return {"acceptance_rate": accepted / drafted, "mean_accepted_length": emitted / forwards}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--target", help="default: the shipped target")
    parser.add_argument("--draft", help="default: the shipped best draft")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--temperatures", default="0.3,0.6,0.8,1.0")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--commit", help="the commit being measured, where the checkout has no git metadata")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.temperatures, args.num_prompts, args.max_new_tokens = "0.8", 2, 12
    family = shipped()
    target, draft = args.target or str(family.target), args.draft or str(family.best_draft)
    decoder = SpeculativeDecoder(target, draft, device=args.device)
    prompts = load_prompts("humaneval")[: args.num_prompts]
    report = {
        **measurement_header(decoder.device, args.commit),
        "target": target,
        "draft": draft,
        "gamma": args.gamma,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "temperatures": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for temperature in (float(value) for value in args.temperatures.split(",")):
        entry = {"temperature": temperature}
        for name, coupled in (("rejection", False), ("coupled", True)):
            entry[name] = measure(decoder, prompts, temperature, args.gamma, args.max_new_tokens, coupled)
        entry["accepted_length_ratio"] = (
            entry["coupled"]["mean_accepted_length"] / entry["rejection"]["mean_accepted_length"]
        )
        report["temperatures"].append(entry)
        (args.out / "coupling.json").write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"T={temperature}: TAR rejection {entry['rejection']['acceptance_rate']:.3f} / coupled "
            f"{entry['coupled']['acceptance_rate']:.3f}; accepted length "
            f"{entry['rejection']['mean_accepted_length']:.2f} / {entry['coupled']['mean_accepted_length']:.2f} "
            f"({entry['accepted_length_ratio']:.2f}x)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
