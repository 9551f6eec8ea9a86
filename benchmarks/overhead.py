"""What the engine adds around the model: its decode step against the runners' own forwards, side by side in one run.

    python benchmarks/overhead.py --out OUT                   # on cuda: Llama-3-8B shape, random bf16 weights
    python benchmarks/overhead.py --device cpu --quick --out /tmp/overhead-smoke

For each batch size B: the runner's own loop (one-token steps of B rows back to back, one sync at the end: what the
GPU needs per step) and the engine stepping B rows with the target alone (`speculative=False`), timed once every
prompt is prefilled — every bit of Python around the model and the per-step wait for the device included. Goal: the
engine's step ≤ 1.15x the runner's at B = 64 and ≤ 1.05x at B = 1. The engine runs with and without its look-ahead
(the next target step queued before this one's results are read), alternating. JSON is written after every batch size.

Speculative steps (`--gammas`, default 2 and 4; a random Llama-3.2-1B-shaped draft): the engine's step at a fixed γ,
with steps queued ahead (the default on a GPU) and without, against the forwards such a step runs — the draft's γ
passes (two tokens, then one) and the target's verify of γ + 1 tokens — queued back to back by the runners alone.
Random weights accept (almost) nothing, which changes no forward's cost. Goal: ≤ 1.15x at B = 1, 16 and 64.
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


def forwards_ms(decoder: SpeculativeDecoder, batch: int, gamma: int, steps: int) -> float:
    """ms per speculative step's forwards, the runners alone, back to back: the draft fed two tokens then γ − 1 single
    tokens, the target γ + 1 tokens; both cut back after each step so positions stay put."""
    target, draft, device = decoder.target_runner, decoder.draft_runner, decoder.device
    slots = list(range(batch))
    for runner in (target, draft):
        for slot in slots:
            runner.reset(slot)
            runner.extend(slot, torch.zeros(128, dtype=torch.long, device=device))
    pair = torch.zeros(batch, 2, dtype=torch.long, device=device)
    one = torch.zeros(batch, 1, dtype=torch.long, device=device)
    verify = torch.zeros(batch, gamma + 1, dtype=torch.long, device=device)

    def step() -> None:
        draft.step(slots, pair)
        for _ in range(gamma - 1):
            draft.step(slots, one)
        target.step(slots, verify)
        for slot in slots:
            draft.rollback(slot, 128)
            target.rollback(slot, 128)

    step()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - began) / steps
    for runner in (target, draft):
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
    parser.add_argument("--gammas", default="2,4", help="fixed γ of the speculative steps measured ('' for none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commit", help="the commit being measured, where the checkout has no git metadata")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    gammas = [int(gamma) for gamma in args.gammas.split(",") if gamma]
    if args.quick:
        sizes, args.tokens, args.repeats = [1, 4], 8, 1
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = llama_shapes(args.quick)
    shape = shapes["llama-3-8b"]
    draft = random_model(shapes["llama-3.2-1b"], device, dtype) if gammas else None
    decoder = SpeculativeDecoder(
        random_model(shape, device, dtype), draft, device=device, dtype=dtype, max_batch_size=max(sizes)
    )
    decoder.warm_up(max(gammas, default=1))
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
        for gamma in gammas:
            engine_step_ms(decoder, batch, 8, gamma=gamma)
            queued, unqueued, own = [], [], []
            for _ in range(args.repeats):
                queued.append(engine_step_ms(decoder, batch, args.tokens, gamma=gamma))
                unqueued.append(engine_step_ms(decoder, batch, args.tokens, look_ahead=False, gamma=gamma))
                own.append(forwards_ms(decoder, size, gamma, args.tokens))
            speculative = {
                "forwards_ms_per_step": statistics.median(own),
                "engine_ms_per_step": statistics.median(queued),
                "engine_without_queueing_ms_per_step": statistics.median(unqueued),
            }
            speculative["engine_vs_forwards"] = speculative["engine_ms_per_step"] / speculative["forwards_ms_per_step"]
            speculative["without_queueing_vs_forwards"] = (
                speculative["engine_without_queueing_ms_per_step"] / speculative["forwards_ms_per_step"]
            )
            entry[f"gamma_{gamma}"] = speculative
            print(
                f"B={size:>3} γ={gamma} forwards {speculative['forwards_ms_per_step']:.2f} ms/step, engine "
                f"{speculative['engine_ms_per_step']:.2f} ms/step: {speculative['engine_vs_forwards']:.3f}x; not "
                f"queued {speculative['engine_without_queueing_ms_per_step']:.2f} ms/step: "
                f"{speculative['without_queueing_vs_forwards']:.3f}x",
                flush=True,
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
