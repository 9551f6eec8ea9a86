"""What the engine adds around the model: its decode step against the runner's own step, side by side in one run.

    python benchmarks/overhead.py --out OUT                   # on cuda: Llama-3-8B shape, random bf16 weights
    python benchmarks/overhead.py --device cpu --quick --out /tmp/overhead-smoke

For each batch size B: the runner's own loop (one-token steps of B rows back to back, one sync at the end: what the
GPU needs per step) and the engine stepping B rows with the target alone (`speculative=False`), timed once every
prompt is prefilled — every bit of Python around the model and the per-step wait for the device included. Goal: the
engine's step ≤ 1.15x the runner's at B = 64 and ≤ 1.05x at B = 1. The engine runs with and without its look-ahead
(the next target step queued before this one's results are read), alternating. JSON is written after every batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from gpu import llama_shapes, random_model

from speculor.api import SpeculativeDecoder
from speculor.provenance import measurement_header


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def runner_step_ms(decoder: SpeculativeDecoder, batch: int, steps: int) -> float:
    """ms per one-token step of `batch` rows, the runner alone, steps queued back to back."""
    runner, device = decoder.target_runner, decoder.device
    slots = list(range(batch))
    for slot in slots:
        runner.reset(slot)
        runner.extend(slot, torch.zeros(128, dtype=torch.long, device=device))
    tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    runner.step(slots, tokens)
    synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        runner.step(slots, tokens)
    synchronize(device)
    seconds = (time.perf_counter() - began) / steps
    for slot in slots:
        runner.reset(slot)
    return 1000 * seconds


def engine_step_ms(
    decoder: SpeculativeDecoder, prompts: list[list[int]], steps: int, look_ahead: bool = True, **options
) -> float:
    """ms per engine decode step of these rows once every prompt is prefilled (prefill chunks of joining rows
    would otherwise count as decode time): the engine's host work, its per-step device wait and the step itself."""
    engine = decoder.new_engine()
    engine.look_ahead = look_ahead and engine.look_ahead
    for prompt in prompts:
        engine.add(decoder.request(prompt, max_new_tokens=steps + 8, ignore_eos=True, **options))
    started = set()
    while len(started) < len(prompts):
        started.update(event.request_id for event in engine.step() if event.delta.token_ids)
    synchronize(decoder.device)
    began = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = (time.perf_counter() - began) / steps
    for request_id in list(engine._rows):
        engine.abort(request_id)
    return 1000 * seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commit", help="the commit being measured, where the checkout has no git metadata")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    if args.quick:
        sizes, args.tokens, args.repeats = [1, 4], 8, 1
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = llama_shapes(args.quick)["llama-3-8b"]
    decoder = SpeculativeDecoder(
        random_model(shape, device, dtype), device=device, dtype=dtype, max_batch_size=max(sizes)
    )
    decoder.warm_up(1)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(shape.vocab_size, (max(sizes), 128), generator=generator).tolist()
    report = {
        **measurement_header(device, args.commit),
        "shape": "llama-3-8b, random bf16" if device.type == "cuda" else "toy",
        "batches": [],
    }
    for size in sizes:
        batch = prompts[:size]
        engine_step_ms(decoder, batch, 8, speculative=False)
        engine, plain, runner = [], [], []
        for _ in range(args.repeats):
            engine.append(engine_step_ms(decoder, batch, args.tokens, speculative=False))
            plain.append(engine_step_ms(decoder, batch, args.tokens, look_ahead=False, speculative=False))
            runner.append(runner_step_ms(decoder, size, args.tokens))
        entry = {
            "batch_size": size,
            "runner_ms_per_step": statistics.median(runner),
            "engine_ms_per_step": statistics.median(engine),
            "engine_without_look_ahead_ms_per_step": statistics.median(plain),
        }
        entry["engine_vs_runner"] = entry["engine_ms_per_step"] / entry["runner_ms_per_step"]
        entry["without_look_ahead_vs_runner"] = (
            entry["engine_without_look_ahead_ms_per_step"] / entry["runner_ms_per_step"]
        )
        report["batches"].append(entry)
        (args.out / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"B={size:>3} runner {entry['runner_ms_per_step']:.2f} ms/step, engine {entry['engine_ms_per_step']:.2f} "
            f"ms/step: {entry['engine_vs_runner']:.3f}x; without the look-ahead "
            f"{entry['engine_without_look_ahead_ms_per_step']:.2f} ms/step: "
            f"{entry['without_look_ahead_vs_runner']:.3f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
