"""EAGLE-3 heads against a separate draft of the same training budget, and what a head costs per step (issue 26).

    python benchmarks/eagle.py --out OUT                                  # on cuda, both parts
    python benchmarks/eagle.py --device cpu --quick --out /tmp/eagle-smoke

Part a: a pair trained in the run (`speculor train`: target 32x576 for --target-seconds, draft 4x256 distilled from
it for --draft-seconds), and an EAGLE-3 head for the same target trained by `speculor train-eagle` for the same
budget as the draft. On HumanEval prompts with --new-tokens forced tokens, greedy, for every batch size B (at most B
rows decoding at once, the next prompt joining as a row ends, as in a server at concurrency B): the target
alone, the draft and the head at a fixed γ (--gamma) and at the default (load-aware) γ: tokens/s, speedup over the
target alone, TAR by draft position and tokens per target forward, side by side.

Part b: the Llama-3-8B shape with random weights (a head shaped like one of its layers, 32k-token draft
vocabulary): the target's verify step of γ + 1 tokens for B rows without feature capture and with it (a second
runner on the same weights that hands features to a sink copying them, as the proposer does), and one head
forward (B rows, one token), each timed back to back on its own. Goals (issue 26): capture ≤ 3% of the step.

JSON per part (part_a.json, part_b.json in --out), written as each measurement finishes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from gpu import llama_shapes, random_model

from speculor.api import SpeculativeDecoder
from speculor.eagle import Eagle3Proposer, default_feature_layers, head_for_target
from speculor.prompts import load_prompt_set, render_prompt
from speculor.provenance import measurement_header
from speculor.runners import make_runner


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write(out: Path, name: str, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(data, indent=2) + "\n")


def run_rows_at_most(engine, requests: list, rows: int) -> list:
    """Run `requests` to completion with at most `rows` of them in the batch at once, a new one joining as soon as one
    ends (a server's continuous batching at concurrency `rows`); results in order."""
    results: dict[int, object] = {}
    order: dict[int, int] = {}
    waiting = list(enumerate(requests))[::-1]
    while waiting or engine.running:
        while waiting and engine.running < rows:
            index, request = waiting.pop()
            order[engine.add(request)] = index
        for event in engine.step():
            if event.result is not None:
                results[order.pop(event.request_id)] = event.result
    return [results[index] for index in range(len(requests))]


def train_models(args: argparse.Namespace) -> tuple[str, str, str]:
    """(target, draft, head) directories: trained in the run unless --family-dir already holds them."""
    from speculor.train import train_family
    from speculor.train_eagle import train_eagle_head

    family = Path(args.family_dir)
    target, draft, head = family / "target", family / "draft", family / "eagle3"
    corpus_bytes = 2_000_000 if args.quick else args.max_corpus_bytes
    if not (target / "config.json").exists():
        shapes = (
            ["target:2x64@4", "draft:1x32@2"]
            if args.quick
            else [
                f"target:32x576@{args.target_seconds:g}",
                f"draft:4x256@{args.draft_seconds:g}",
            ]
        )
        train_family(
            family,
            shapes,
            max_corpus_bytes=corpus_bytes,
            sequence_length=256 if args.quick else 1024,
            distill_from="target",
            device=args.device,
            progress=False,
        )
    if not (head / "config.json").exists():
        train_eagle_head(
            head,
            target,
            max_corpus_bytes=corpus_bytes,
            seconds=2 if args.quick else args.draft_seconds,
            batch_size=4 if args.quick else 32,
            sequence_length=64 if args.quick else 512,
            ttt_steps=2 if args.quick else 7,
            draft_vocab_size=512 if args.quick else 8192,
            device=args.device,
            held_out_prompt_count=2,
            progress=False,
        )
    return str(target), str(draft), str(head)


def part_a(args: argparse.Namespace, out: Path) -> dict:
    target, draft, head = train_models(args)
    results: dict = {"header": measurement_header(args.device), "target": target, "draft": draft, "head": head}
    results["rows"] = []
    largest = max(args.batch_sizes)
    loader = {"device": args.device, "max_batch_size": largest, "threads": None}
    decoders = {
        "target": SpeculativeDecoder(target, **loader),
        "draft": SpeculativeDecoder(target, draft, **loader),
        "eagle3": SpeculativeDecoder(target, head, **loader),
    }
    for decoder in decoders.values():
        decoder.warm_up(args.gamma)
    tokenizer = decoders["target"].tokenizer
    prompts = [
        decoders["target"].encode(render_prompt(prompt, tokenizer))
        for prompt in load_prompt_set("humaneval", limit=args.prompts)
    ]
    for batch in args.batch_sizes:
        chosen = (prompts * (1 + batch // len(prompts)))[: max(batch, len(prompts))]
        baseline = None
        for name, decoder in decoders.items():
            for gamma in [None] if name == "target" else [args.gamma, None]:
                options = {"max_new_tokens": args.new_tokens, "ignore_eos": True, "gamma": gamma}
                options["speculative"] = name != "target"
                requests = [decoder.request(prompt, **options) for prompt in chosen]
                engine = decoder.new_engine()
                engine.prefill_chunk = 1 << 16
                synchronize(decoder.device)
                began = time.perf_counter()
                generated = run_rows_at_most(engine, requests, batch)
                synchronize(decoder.device)
                seconds = time.perf_counter() - began
                tokens = sum(result.stats.new_tokens for result in generated)
                drafted = [0] * 8
                accepted = [0] * 8
                for result in generated:
                    for position, count in enumerate(result.stats.drafted_by_position[:8]):
                        drafted[position] += count
                    for position, count in enumerate(result.stats.accepted_by_position[:8]):
                        accepted[position] += count
                forwards = sum(result.stats.target_forwards for result in generated)
                row = {
                    "batch": batch,
                    "drafter": name,
                    "gamma": gamma if gamma is not None else "load-aware",
                    "tokens_per_second": tokens / seconds,
                    "tokens_per_target_forward": tokens / max(1, forwards),
                    "tar_by_position": [a / d for a, d in zip(accepted, drafted, strict=True) if d],
                }
                if name == "target":
                    baseline = row["tokens_per_second"]
                row["speedup_over_target"] = row["tokens_per_second"] / baseline if baseline else None
                results["rows"].append(row)
                write(out, "part_a.json", results)
                print(json.dumps(row))
    return results


def step_ms(work, device: torch.device, repeats: int) -> float:
    work()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        work()
    synchronize(device)
    return 1000 * (time.perf_counter() - began) / repeats


def part_b(args: argparse.Namespace, out: Path) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = llama_shapes(args.quick)["llama-3-8b"]
    model = random_model(config, device, dtype)
    layers = default_feature_layers(config.num_hidden_layers)
    results: dict = {"header": measurement_header(device), "shape": "llama-3-8b", "layers": list(layers), "rows": []}
    repeats = 3 if args.quick else 50
    plain = make_runner(model, "auto", slots=max(args.batch_sizes))
    capturing = make_runner(model, "auto", slots=max(args.batch_sizes))
    head = head_for_target(model, range(min(32000, config.vocab_size)), layers)
    proposer = Eagle3Proposer(head, layers, capturing, config.vocab_size)
    width = args.gamma + 1
    for runner in (plain, capturing):
        if hasattr(runner, "warm_up"):
            runner.warm_up([1, width])
    for batch in args.batch_sizes:
        slots = list(range(batch))
        for runner in (plain, capturing):
            for slot in slots:
                runner.reset(slot)
                runner.extend(slot, torch.zeros(256, dtype=torch.long, device=device))
        tokens = torch.zeros(batch, width, dtype=torch.long, device=device)

        def verify(runner=plain, slots=slots, tokens=tokens) -> None:
            runner.step(slots, tokens)
            for slot in slots:
                runner.rollback(slot, 256)

        inputs = (
            torch.arange(batch, device=device),
            torch.zeros(batch, 1, dtype=torch.long, device=device),
            torch.zeros(batch, 1, config.hidden_size, dtype=dtype, device=device),
            torch.full((batch, 1), 256, dtype=torch.long, device=device),
        )

        def head_forward(inputs=inputs) -> None:
            with torch.inference_mode():
                proposer._forward(*inputs, 257)

        row = {
            "batch": batch,
            "verify_tokens": width,
            "target_step_ms": step_ms(verify, device, repeats),
            "target_step_with_capture_ms": step_ms(lambda: verify(capturing), device, repeats),
            "head_forward_ms": step_ms(head_forward, device, repeats),
        }
        row["capture_overhead"] = row["target_step_with_capture_ms"] / row["target_step_ms"] - 1
        row["head_forward_share_of_step"] = row["head_forward_ms"] / row["target_step_ms"]
        results["rows"].append(row)
        write(out, "part_b.json", results)
        print(json.dumps(row))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="toy shapes and budgets: a smoke test on the CPU")
    parser.add_argument("--parts", default="ab")
    parser.add_argument("--family-dir", help="where the trained pair and head go (default: OUT/family)")
    parser.add_argument("--target-seconds", type=float, default=180)
    parser.add_argument("--draft-seconds", type=float, default=45)
    parser.add_argument("--max-corpus-bytes", type=int, default=200_000_000)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    args = parser.parse_args()
    out = Path(args.out)
    args.family_dir = args.family_dir or str(out / "family")
    if args.batch_sizes is None:
        args.batch_sizes = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    if args.quick:
        args.prompts, args.new_tokens = 2, 16
    if "a" in args.parts:
        part_a(args, out)
    if "b" in args.parts:
        part_b(args, out)


if __name__ == "__main__":
    main()
