"""The tensor-parallel benchmark: the sharded fast runner on Llama-3-8B and Llama-3-70B shapes with random weights,
one process per GPU, launched by torchrun. Each rank builds only its own shard (random at the shard's shapes), so a
70B-shaped model never exists whole anywhere.

    torchrun --nproc-per-node 1 benchmarks/tp.py --parts step --out benchmarks/results/tp
    torchrun --nproc-per-node 2 benchmarks/tp.py --parts step,large --out benchmarks/results/tp
    torchrun --nproc-per-node 4 benchmarks/tp.py --parts large --out benchmarks/results/tp
    torchrun --nproc-per-node 2 benchmarks/tp.py --quick --out /tmp/tp-smoke     # CPU, gloo, tiny shapes: seconds

Parts (`--parts step,large`), each written to OUT/tp-PART-N.json (N ranks) with the git commit:
  step   the 8B shape split over the launched ranks (run it at N = 1 and 2 to compare): ms per step at batch 1
         and 64 rows × k = 1 and 6 tokens per row, every row at --context cached tokens.
  large  a 70B-shaped target (80 layers × 8192) split over the ranks with an 8B-shaped draft whole on every rank:
         AR tokens/s at batch 1 against the floor set by reading each rank's weights at its measured copy
         bandwidth; the target's step cost at k = 1..6 (a speculative verify of γ = k − 1 drafts) and the
         predicted speculative step (γ draft steps + one verify); the draft/target cost ratio c. In bf16 the 70B
         shard is 70 GB per rank at N = 2, which with the 16 GB draft needs H200s; N = 4 fits H100s.
Only rank 0 prints and writes; every rank runs the same steps (their all-reduces must meet).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig

from speculor.distributed import TensorParallelGroup, join_group, launched_world_size
from speculor.runners.fast import FastRunner
from speculor.runners.tensor_parallel import random_fast_runner

REPOSITORY = Path(__file__).resolve().parent.parent
ROPE_LLAMA_3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def shapes(quick: bool) -> dict[str, LlamaConfig]:
    """The 8B and 70B shapes (Llama 3), or toy ones with the same head layout for a CPU smoke test."""
    if quick:
        toy = dict(vocab_size=512, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
        return {
            "8b": LlamaConfig(**toy, hidden_size=64, intermediate_size=128, num_hidden_layers=2),
            "70b": LlamaConfig(**toy, hidden_size=128, intermediate_size=256, num_hidden_layers=4),
        }
    common = dict(
        vocab_size=128256,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters=ROPE_LLAMA_3,
        tie_word_embeddings=False,
    )
    return {
        "8b": LlamaConfig(
            **common, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32
        ),
        "70b": LlamaConfig(
            **common, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
        ),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def line_up(group: TensorParallelGroup | None, device: torch.device) -> None:
    """Start a measurement on every rank together, so no rank's time includes waiting for another to arrive."""
    synchronize(device)
    if group is not None:
        dist.barrier(group=group.group)


def fill(runner: FastRunner, rows: int, context: int, seed: int = 0) -> None:
    """Give slots 0..rows-1 `context` cached tokens each (the same random tokens on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, runner.vocab_size, (rows, context), generator=generator)
    for slot in range(rows):
        runner.reset(slot)
    runner.extend_rows(list(range(rows)), list(tokens.to(runner.device)))


def step_seconds(
    runner: FastRunner, rows: int, width: int, repeats: int, group: TensorParallelGroup | None, context: int
) -> float:
    """Median seconds of a step of `width` tokens on `rows` rows at `context` cached tokens (each step rolled back,
    so every one sees the same lengths), timed back to back over `repeats` steps, median of three such runs."""
    slots = list(range(rows))
    tokens = torch.ones((rows, width), dtype=torch.long, device=runner.device)

    def once() -> None:
        runner.step(slots, tokens)
        for slot in slots:
            runner.rollback(slot, context)

    once()
    runs = []
    for _ in range(3):
        line_up(group, runner.device)
        began = time.perf_counter()
        for _ in range(repeats):
            once()
        synchronize(runner.device)
        runs.append((time.perf_counter() - began) / repeats)
    return statistics.median(runs)


def weight_bytes(runner: FastRunner) -> int:
    """Bytes of weights one step reads on this rank: every layer's shard, the final norm and the output layer (the
    input embedding is a gather of a few rows)."""
    weights = runner.weights
    tensors = [weights.final_norm, weights.lm_head]
    for layer in weights.layers:
        tensors += [value for value in vars(layer).values() if isinstance(value, torch.Tensor)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def copy_bandwidth(device: torch.device, size: int) -> float:
    """Bytes per second a device-to-device copy reads and writes (median of 10)."""
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(10):
        synchronize(device)
        began = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        times.append(time.perf_counter() - began)
    return 2 * size / statistics.median(times)


def part_step(args: argparse.Namespace, group: TensorParallelGroup | None, device: torch.device) -> dict:
    batches, widths = (1, args.max_batch), (1, 6)
    options = {"slots": args.max_batch, "max_cache_length": args.context + max(widths), "kernels": "auto"}
    runner = random_fast_runner(shapes(args.quick)["8b"], device, args.dtype, group, **options)
    runner.warm_up(list(widths))
    fill(runner, args.max_batch, args.context)
    milliseconds = {
        f"batch {rows}, k {width}": 1000 * step_seconds(runner, rows, width, args.repeats, group, args.context)
        for rows in batches
        for width in widths
    }
    return {
        "shape": "8b",
        "context": args.context,
        "ms_per_step": milliseconds,
        "rank_weight_bytes": weight_bytes(runner),
    }


def part_large(args: argparse.Namespace, group: TensorParallelGroup | None, device: torch.device) -> dict:
    configs = shapes(args.quick)
    widths = list(range(1, 7))
    options = {"slots": 1, "max_cache_length": args.context + max(widths)}
    target = random_fast_runner(configs["70b"], device, args.dtype, group, seed=1, **options)
    draft = random_fast_runner(configs["8b"], device, args.dtype, None, seed=2, **options)
    target.warm_up(widths)
    draft.warm_up([1])
    fill(target, 1, args.context)
    fill(draft, 1, args.context)
    target_ms = {width: 1000 * step_seconds(target, 1, width, args.repeats, group, args.context) for width in widths}
    draft_ms = 1000 * step_seconds(draft, 1, 1, args.repeats, group, args.context)
    read = weight_bytes(target)
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    floor_tokens_per_second = bandwidth / read
    ar_tokens_per_second = 1000 / target_ms[1]
    return {
        "target_shape": "70b",
        "draft_shape": "8b (whole on every rank)",
        "context": args.context,
        "rank_weight_bytes": read,
        "copy_bandwidth_bytes_per_second": bandwidth,
        "ar_tokens_per_second": ar_tokens_per_second,
        "floor_tokens_per_second": floor_tokens_per_second,
        "ar_share_of_floor": ar_tokens_per_second / floor_tokens_per_second,
        "target_ms_by_k": target_ms,
        "verify_cost_by_k": {width: target_ms[width] / target_ms[1] for width in widths},
        "draft_ms": draft_ms,
        "draft_target_cost_ratio": draft_ms / target_ms[1],
        "speculative_step_ms_by_gamma": {k - 1: (k - 1) * draft_ms + target_ms[k] for k in widths if k > 1},
    }


PARTS = {"step": part_step, "large": part_large}


def git_commit() -> str | None:
    """The commit measured, marked "-dirty" when the working tree differs from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPOSITORY, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPOSITORY, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="step,large", help="comma-separated: step, large")
    parser.add_argument("--out", required=True, help="directory for tp-PART-N.json")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="toy shapes, few repeats: a smoke test (CPU: seconds)")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}: choose from {', '.join(PARTS)}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    args.context = 16 if args.quick else 512
    args.max_batch = 4 if args.quick else 64
    args.repeats = 3 if args.quick else 20
    args.copy_bytes = (1 << 20) if args.quick else (1 << 30)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    size = launched_world_size()
    group = join_group(size, args.device) if size > 1 else None
    device = group.device if group is not None else args.device
    if device.type == "cpu":
        torch.set_num_threads(1)
    main_rank = group is None or group.is_main
    out = Path(args.out)
    for part in args.parts:
        with torch.inference_mode():
            result = PARTS[part](args, group, device)
        if not main_rank:
            continue
        record = {
            "part": part,
            "tensor_parallel": size,
            "commit": git_commit(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(args.dtype).removeprefix("torch."),
            "quick": args.quick,
            "torch": torch.__version__,
            "command": " ".join(sys.argv),
            "result": result,
        }
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"tp-{part}-{size}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps({"part": part, "tensor_parallel": size, **result}), flush=True)
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
