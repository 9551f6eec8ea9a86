"""The GPU benchmark of speculor: one command, parts selectable, JSON and markdown out, tables printed last.

    python benchmarks/gpu.py --out benchmarks/results/gpu                 # every part, on cuda (about 15 min)
    python benchmarks/gpu.py --parts a,b,d --out OUT                      # 6.5 min on an H200 (measured)
    python benchmarks/gpu.py --parts c --family-dir /tmp/family --out OUT  # 9 min; a rerun reuses the family
    python benchmarks/gpu.py --parts e --out OUT                           # batched runner steps, 90 s on an H200
    python benchmarks/gpu.py --parts f --out OUT                           # the same on the Gemma-2 pair
    python benchmarks/gpu.py --device cpu --quick --parts a,b,c,e --out /tmp/gpu-smoke   # the same code, seconds

Where a machine gives a command 10 minutes, run parts a, b, d and part c as two commands (the times above were
measured on an H200 whose host is slow at launching work: Hugging Face `generate` on the 32-layer target of part c
runs at ~25 tok/s there, and its three paths take about half of part c).

Parts (`--parts a,b,c,d,e`):
  a  device-to-device copy bandwidth, and the floor per token (weight bytes read per forward / bandwidth) of a
     Llama-3-8B-shaped target and a Llama-3.2-1B-shaped draft.
  b  on those shapes with random bf16 weights: HF `generate` and speculor AR (fast runner) decode tokens/s as a
     share of the floor; the step time of k = 1, 2, 4, 8, 16 tokens (fast and HF runners); eager / CUDA graph /
     torch.compile step times; the draft/target cost ratio c; the fast runner's logits against transformers'.
  c  a trained pair: `speculor.train.train_family` (fixed seed) on this machine's Python source, then HumanEval,
     greedy and T=0.8: speculor AR, speculor speculative (each draft at its best γ), HF AR, HF assisted generation
     and HF prompt lookup (on a fixed subset), TAR, mean accepted length, speedups against Leviathan's prediction,
     and greedy identity (bf16, float32, and with the fast runner's `fixed_width` uniform rounding).
  d  the same measurements on the shipped demo family (`speculor.models.shipped()`).
  e  the batched fast runner on part b's Llama-3-8B and Llama-3.2-1B shapes (random bf16 weights): ms per step
     for batch B = 1..64 rows × k = 1..6 tokens per row (rows of different lengths), AR decode tokens/s at each B
     (one-token steps over B rows, each row's argmax fed back), Hugging Face `generate` on the same left-padded
     batch as the reference, the warm-up (graph captures) time, and batch 1 against the stored part b step times.
  f  part e's measurements on Gemma-2-9B and Gemma-2-2B shapes (sliding-window and global layers, soft-capping).
Parts whose dependencies are missing are skipped with a note. Tokens/s are decode rates: tokens after the first
over the time after the first (prefill and time to first token excluded), for HF and speculor alike.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from speculor.analysis import alpha_from_tar, predicted_speedup
from speculor.api import SpeculativeDecoder
from speculor.engine import GenerationResult
from speculor.provenance import source_revision
from speculor.runners import FastRunner, HFRunner

PARTS = ("a", "b", "c", "d", "e", "f")
VERIFY_WIDTHS = (1, 2, 4, 8, 16)
GAMMAS = (2, 3, 4, 5, 6, 8)
TEMPERATURES = (0.0, 0.8)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
ROW_WIDTHS = (1, 2, 3, 4, 5, 6)
# Part b's step times before the runner took batches (H200, fused kernels), for part e's batch-1 comparison.
STORED_PART_B = Path(__file__).parent / "results" / "gpu-2026-11-27-h200-fused-abd.json"


# (target shape, draft shape) pairs of part b: the brief's 8B/1B pair, and the launch-bound scale of part c.
SHAPE_PAIRS = (("llama-3-8b", "llama-3.2-1b"), ("small-32x576", "small-4x256"))
GEMMA_PAIR = ("gemma-2-9b", "gemma-2-2b")


def gemma2_shapes(quick: bool) -> dict[str, Gemma2Config]:
    """Gemma-2-9B and Gemma-2-2B shapes (their published configs: alternating 4096-token sliding-window and global
    layers, soft-capped attention scores and logits, 256k vocabulary); toy stand-ins for a smoke test (window 16)."""
    if quick:
        toy = dict(vocab_size=1000, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
        return {
            name: Gemma2Config(**toy, hidden_size=width, num_hidden_layers=layers, sliding_window=16)
            for name, layers, width in zip(GEMMA_PAIR, (4, 2), (128, 64), strict=True)
        }
    common = dict(vocab_size=256000, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096)
    common |= dict(max_position_embeddings=8192, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    return {
        "gemma-2-9b": Gemma2Config(
            **common,
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
        ),
        "gemma-2-2b": Gemma2Config(
            **common,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
        ),
    }


def llama_shapes(quick: bool) -> dict[str, LlamaConfig]:
    """Llama-3-8B and Llama-3.2-1B shapes (their published configs) and two of part c's trained shapes (32x576
    target, 4x256 draft, 8192-token vocabulary); toy stand-ins for a smoke test."""
    rope_8b = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if quick:
        toy = dict(vocab_size=1000, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
        return {
            name: LlamaConfig(**toy, hidden_size=width, num_hidden_layers=layers, max_position_embeddings=1024)
            for name, layers, width in zip(sum(SHAPE_PAIRS, ()), (4, 2, 3, 1), (128, 64, 64, 32), strict=True)
        }
    shapes = {
        "llama-3-8b": LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters=rope_8b,
            tie_word_embeddings=False,
        ),
        "llama-3.2-1b": LlamaConfig(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_parameters={**rope_8b, "factor": 32.0},
            tie_word_embeddings=True,
        ),
    }
    for name, layers, width in (("small-32x576", 32, 576), ("small-4x256", 4, 256)):
        heads = width // 64
        shapes[name] = LlamaConfig(
            vocab_size=8192,
            hidden_size=width,
            intermediate_size=-(-8 * width // 3 // 32) * 32,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
            head_dim=64,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    return shapes


@dataclass
class Settings:
    """Sizes of the runs; `quick` shrinks everything to a CPU smoke test of the same code paths."""

    quick: bool
    device: torch.device
    out: Path
    family_dir: Path
    train_seconds: float
    draft_seconds: float
    max_corpus_bytes: int
    compare_capture: bool
    target_shape: str = "32x576"
    new_tokens: int = 64
    hf_new_tokens: int = 16
    hf_prompts: int = 32
    tune_prompts: int = 8
    identity_prompts: int = 32
    prompt_limit: int | None = None
    copy_bytes: int = 1 << 30
    random_prompt_tokens: int = 128
    random_new_tokens: int = 128
    step_repeats: int = 20
    hf_step_repeats: int = 5
    notes: list[str] = field(default_factory=list)
    save: Callable[[], None] = lambda: None
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.quick:
            self.new_tokens, self.hf_prompts, self.tune_prompts, self.identity_prompts = 12, 2, 2, 2
            self.prompt_limit, self.copy_bytes, self.step_repeats, self.hf_step_repeats = 3, 1 << 22, 3, 3
            self.hf_new_tokens = 8
            self.random_prompt_tokens, self.random_new_tokens = 16, 12
            self.max_corpus_bytes = 1 << 21

    def say(self, message: str) -> None:
        """A progress line with the seconds since the start, and a checkpoint of the report so far."""
        print(f"[{time.perf_counter() - self.started:6.0f} s] {message}", file=sys.stderr, flush=True)
        self.save()

    @property
    def dtype(self) -> torch.dtype:
        """bfloat16 on a GPU; float32 on the CPU, where bfloat16 matrix products are slow."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds that `work` takes, device work included."""
    synchronize(device)
    began = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - began


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- part a


def copy_bandwidth(device: torch.device, size: int, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy of `size` bytes (read plus written), median of `repeats`."""
    source = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    times = [timed(device, lambda: target.copy_(source)) for _ in range(repeats)]
    return 2 * size / statistics.median(times)


def bytes_read_per_forward(config: LlamaConfig, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(all weight bytes, weight bytes a one-token forward reads): the input embedding is a gather of one row, so it
    only counts when it doubles as the (tied) output head."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    size = torch.finfo(dtype).bits // 8
    total = sum(parameter.numel() for parameter in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    read = total if config.tie_word_embeddings else total - embedding
    return total * size, read * size


def part_a(settings: Settings) -> dict:
    bandwidth = copy_bandwidth(settings.device, settings.copy_bytes)
    shapes = {}
    for name, config in llama_shapes(settings.quick).items():
        total, read = bytes_read_per_forward(config)
        floor = read / bandwidth
        shapes[name] = {
            "weight_bytes": total,
            "bytes_read_per_forward": read,
            "floor_ms": floor * 1e3,
            "floor_tokens_per_second": 1 / floor,
        }
    return {"copy_bandwidth_bytes_per_second": bandwidth, "copy_bytes": settings.copy_bytes, "shapes": shapes}


# ---------------------------------------------------------------------------------------------------- part b


def random_model(config: PretrainedConfig, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """A randomly initialised model built directly in `dtype` on `device` (no float32 copy on the way)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def hf_generate(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, temperature: float, **extra) -> list:
    """Hugging Face `generate` with exactly `new_tokens` new tokens (EOS suppressed until then), no top-k."""
    sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {}
    pad = model.generation_config.pad_token_id
    output = model.generate(
        input_ids=prompt.view(1, -1),
        attention_mask=torch.ones_like(prompt).view(1, -1),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=bool(temperature),
        pad_token_id=pad if pad is not None else 0,
        **sampling,
        **extra,
    )
    return output[0, prompt.numel() :].tolist()


def hf_decode_rate(model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    """HF `generate` greedy decode tokens/s: (n − 1) tokens over the time of n tokens minus the time of one."""
    hf_generate(model, prompt, 2, 0.0)
    one = statistics.median(timed(device, lambda: hf_generate(model, prompt, 1, 0.0)) for _ in range(3))
    many = timed(device, lambda: hf_generate(model, prompt, new_tokens, 0.0))
    return (new_tokens - 1) / (many - one)


def decode_rate(results: Sequence[GenerationResult]) -> float:
    """Tokens after the first over the time after the first token, summed over generations."""
    tokens = sum(len(result.token_ids) - 1 for result in results)
    seconds = sum(result.stats.wall_seconds - result.stats.time_to_first_token for result in results)
    return tokens / seconds if seconds > 0 else 0.0


def fill(runner, prompt: torch.Tensor) -> None:
    """Start slot 0 over with `prompt` in its cache."""
    runner.reset(0)
    runner.extend(0, prompt)


def feed(runner, tokens: torch.Tensor) -> torch.Tensor:
    """One step of `tokens` on slot 0; their logits (k, vocab)."""
    return runner.step([0], tokens.view(1, -1))[0]


def step_milliseconds(runner, prompt: torch.Tensor, width: int, repeats: int) -> float:
    """Milliseconds per forward of `width` tokens on a `prompt`-long cache (rolled back after each), from the wall
    time of bursts of `repeats` forwards (median of three bursts): what a decode loop pays per step, host included."""
    return interleaved_step_milliseconds({"runner": (runner, repeats)}, prompt, width)["runner"]


def interleaved_step_milliseconds(runners: dict, prompt: torch.Tensor, width: int, rounds: int = 3) -> dict:
    """`step_milliseconds` for several runners ({name: (runner, repeats)}) whose bursts take turns, so that a load
    drifting during the measurement (a shared CPU) hits each of them alike. Median over `rounds` bursts each."""
    tokens = prompt[:width]
    times: dict[str, list[float]] = {name: [] for name in runners}

    def burst(runner, repeats: int) -> None:
        for _ in range(repeats):
            feed(runner, tokens)
            runner.rollback(0, prompt.numel())

    for runner, repeats in runners.values():
        fill(runner, prompt)
        burst(runner, repeats)
    for _ in range(rounds):
        for name, (runner, repeats) in runners.items():
            times[name].append(timed(prompt.device, lambda runner=runner, repeats=repeats: burst(runner, repeats)))
    return {name: statistics.median(times[name]) / runners[name][1] * 1e3 for name in runners}


def capture_modes(model: PreTrainedModel, prompt: torch.Tensor, settings: Settings) -> dict:
    """Per-step time of the fast runner's step modes at k = 1, and the first call's time (capture/compilation)."""
    modes = ["eager", "graph", "compile"] if settings.device.type == "cuda" else ["eager"]
    found = {}
    for mode in modes:
        try:
            runner = FastRunner(model, capture=mode, max_cache_length=1024)
            fill(runner, prompt)
            first = timed(settings.device, lambda runner=runner: feed(runner, prompt[:1]))
            runner.rollback(0, prompt.numel())
            step = step_milliseconds(runner, prompt, 1, settings.step_repeats)
            found[mode] = {"first_call_seconds": first, "step_ms": step}
        except Exception as error:  # a failing mode is a finding, not a reason to stop the benchmark
            found[mode] = {"error": f"{type(error).__name__}: {error}"}
        free_memory()
    return found


def kernel_profile(model: PreTrainedModel, prompt: torch.Tensor, kernels: str) -> dict:
    """Where a one-token step's device time goes: the eager step under torch.profiler (a graph replays the same
    kernels), kernels counted and summed by name. Device time summed over kernels, set against the captured
    step's wall time, shows how much of a step is launch gaps rather than work."""
    runner = FastRunner(model, capture="eager", max_cache_length=1024, kernels=kernels)
    fill(runner, prompt)
    for _ in range(3):
        feed(runner, prompt[:1])
        runner.rollback(0, prompt.numel())
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        feed(runner, prompt[:1])
        synchronize(prompt.device)
    found = [entry for entry in profiler.key_averages() if entry.device_type == torch.autograd.DeviceType.CUDA]
    times = {entry.key: (entry.self_device_time_total, entry.count) for entry in found}
    top = sorted(times.items(), key=lambda item: -item[1][0])[:12]
    return {
        "kernels_per_step": sum(count for _, count in times.values()),
        "kernel_time_ms": sum(time_us for time_us, _ in times.values()) / 1e3,
        "top": [{"kernel": name[:90], "ms": time_us / 1e3, "count": count} for name, (time_us, count) in top],
    }


def loop_profile(decoder: SpeculativeDecoder, prompt: torch.Tensor, new_tokens: int = 32) -> dict:
    """Where the decode loop's host time goes between captured steps: one AR generation under torch.profiler,
    the host-side operations by self CPU time (the graph replay itself is one launch)."""
    options = dict(max_new_tokens=new_tokens, ignore_eos=True)
    decoder.generate(prompt.tolist(), **options)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        result = decoder.generate(prompt.tolist(), **options)
    operations = sorted(profiler.key_averages(), key=lambda entry: -entry.self_cpu_time_total)[:12]
    return {
        "steps": result.stats.target_forwards,
        "wall_ms_per_step": result.stats.wall_seconds / result.stats.target_forwards * 1e3,
        "top_host_operations": [
            {"operation": entry.key[:60], "count": entry.count, "us_per_step": entry.self_cpu_time_total / new_tokens}
            for entry in operations
        ],
    }


def logits_agreement(config: LlamaConfig, settings: Settings) -> dict:
    """The fast runner against transformers on one random model: float32 relative error, then each runner in
    bfloat16 against the float32 logits (the fast runner should be no further off than transformers)."""
    device = settings.device
    model = random_model(config, device, torch.float32)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (settings.random_prompt_tokens,), generator=generator).to(device)
    step = torch.randint(0, config.vocab_size, (5,), generator=generator).to(device)

    def logits(runner) -> torch.Tensor:
        fill(runner, prompt)
        return feed(runner, step).double()

    def error(actual: torch.Tensor, expected: torch.Tensor) -> float:
        return float((actual - expected).norm() / expected.norm())

    reference = logits(HFRunner(model))
    fast32 = logits(FastRunner(model, max_cache_length=1024))
    plain32 = logits(FastRunner(model, max_cache_length=1024, kernels="torch"))
    model.to(torch.bfloat16)
    hf16 = logits(HFRunner(model))
    fast16 = logits(FastRunner(model, max_cache_length=1024))
    del model
    free_memory()
    return {
        "float32_fast_vs_hf": error(fast32, reference),
        "float32_fast_torch_kernels_vs_hf": error(plain32, reference),
        "bfloat16_hf_vs_float32": error(hf16, reference),
        "bfloat16_fast_vs_float32": error(fast16, reference),
        "bfloat16_fast_vs_hf_bfloat16": error(fast16, hf16),
        "bfloat16_top1_agreement_fast_vs_hf": float((fast16.argmax(-1) == hf16.argmax(-1)).float().mean()),
    }


def part_b(settings: Settings, floors: dict) -> dict:
    device = settings.device
    shapes = llama_shapes(settings.quick)
    found: dict = {"shapes": {}}
    for name, config in shapes.items():
        model = random_model(config, device, settings.dtype)
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, config.vocab_size, (settings.random_prompt_tokens,), generator=generator).to(device)
        hf_rate = hf_decode_rate(model, prompt, settings.random_new_tokens, device)
        decoder = SpeculativeDecoder(model, device=device, dtype=settings.dtype, runner="fast")
        options = dict(max_new_tokens=settings.random_new_tokens, ignore_eos=True)
        plain = SpeculativeDecoder(model, device=device, dtype=settings.dtype, runner="fast")
        plain.target_runner = FastRunner(model, kernels="torch")
        rates: dict[str, list[GenerationResult]] = {"fused": [], "plain": []}
        for _ in range(3):  # alternate the two, so that drift hits both alike; the first round warms up
            for variant, each in (("fused", decoder), ("plain", plain)):
                rates[variant].append(each.generate(prompt.tolist(), **options))
        runners = {
            "fast": (FastRunner(model, max_cache_length=1024), settings.step_repeats),
            "fast_torch_kernels": (FastRunner(model, max_cache_length=1024, kernels="torch"), settings.step_repeats),
            "hf": (HFRunner(model), settings.hf_step_repeats),
        }
        steps = {k: interleaved_step_milliseconds(runners, prompt, k) for k in VERIFY_WIDTHS}
        speculor_rate = decode_rate(rates["fused"][1:])
        entry = {
            "hf_generate_tokens_per_second": hf_rate,
            "speculor_ar_tokens_per_second": speculor_rate,
            "speculor_ar_torch_kernels_tokens_per_second": decode_rate(rates["plain"][1:]),
            "fused_kernels": runners["fast"][0].fused is not None,
        } | {f"{runner}_step_ms": {k: steps[k][runner] for k in VERIFY_WIDTHS} for runner in runners}
        floor = floors.get(name, {}).get("floor_tokens_per_second")
        if floor:
            entry["hf_share_of_floor"] = hf_rate / floor
            entry["speculor_ar_share_of_floor"] = speculor_rate / floor
        if device.type == "cuda" and name == SHAPE_PAIRS[0][0]:
            try:
                entry["loop_profile"] = loop_profile(decoder, prompt)
            except Exception as error:  # a diagnostic, as below
                entry["loop_profile"] = {"error": f"{type(error).__name__}: {error}"}
            for kernels in ("auto", "torch"):
                key = "kernel_profile" if kernels == "auto" else "kernel_profile_torch_kernels"
                try:
                    entry[key] = kernel_profile(model, prompt, kernels)
                except Exception as error:  # the profiler is a diagnostic; its failure must not cost the numbers
                    entry[key] = {"error": f"{type(error).__name__}: {error}"}
        # torch.compile of the 32-layer shape alone would take minutes of the budget; the others show the trend.
        if settings.compare_capture and name != SHAPE_PAIRS[0][0]:
            entry["capture_modes"] = capture_modes(model, prompt, settings)
        found["shapes"][name] = entry
        del model, decoder, plain, runners
        free_memory()
    found["cost_ratios"] = {}
    for target_name, draft_name in SHAPE_PAIRS:
        target, draft = found["shapes"][target_name], found["shapes"][draft_name]
        found["cost_ratios"][f"{draft_name} / {target_name}"] = {
            runner: draft[f"{runner}_step_ms"][1] / target[f"{runner}_step_ms"][1] for runner in ("fast", "hf")
        }
    found["logits_agreement"] = logits_agreement(shapes[SHAPE_PAIRS[0][1]], settings)
    return found


# ---------------------------------------------------------------------------------------------------- parts c, d


@dataclass
class Family:
    """A target and its drafts, as model directories sharing one tokenizer."""

    name: str
    target: str
    drafts: dict[str, str]
    details: dict = field(default_factory=dict)


def train_pair(settings: Settings) -> Family:
    """Train (or reuse, when `family_dir` already holds one) a target (by default ~130M parameters with the depth
    of Llama-3-8B: 32 layers of width 576) and two drafts: deep-narrow 4x256 and shallow-wide 2x384."""
    from speculor.train import train_family

    directory = settings.family_dir
    shapes = [
        f"target:{settings.target_shape}@{settings.train_seconds:g}",
        f"draft-4x256:4x256@{settings.draft_seconds:g}",
        f"draft-2x384:2x384@{settings.draft_seconds:g}",
    ]
    if settings.quick:
        shapes = ["target:2x64@4", "draft-1x32:1x32@2"]
    summary = directory / "family.json"
    if not summary.exists():
        began = time.perf_counter()
        train_family(
            directory,
            shapes,
            max_corpus_bytes=settings.max_corpus_bytes,
            sequence_length=256 if settings.quick else 1024,
            device=settings.device,
            seed=0,
            progress=False,
        )
        settings.notes.append(f"trained the family in {time.perf_counter() - began:.0f} s")
        settings.say("c: family trained")
        # Training turns TF32 on for speed; the float32 identity check below needs true float32 products.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    details = json.loads(summary.read_text())
    models = details["models"]
    drafts = {name: model["path"] for name, model in models.items() if name != "target"}
    return Family("trained", models["target"]["path"], drafts, details)


def shipped_family() -> Family:
    """The demo family shipped inside the package (`speculor.models.shipped()`), every draft."""
    from speculor.models import shipped

    family = shipped()
    drafts = {name: os.fspath(path) for name, path in family.drafts.items()}
    return Family("shipped", os.fspath(family.target), drafts)


def run_prompts(
    decoder: SpeculativeDecoder, prompts: Sequence[list[int]], new_tokens: int, **options
) -> list[GenerationResult]:
    return [
        decoder.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True, seed=index, **options)
        for index, prompt in enumerate(prompts)
    ]


def summarize(results: Sequence[GenerationResult]) -> dict:
    drafted = sum(result.stats.drafted for result in results)
    accepted = sum(result.stats.accepted for result in results)
    forwards = sum(result.stats.target_forwards for result in results)
    draft_forwards = sum(result.stats.draft_forwards for result in results)
    tokens = sum(result.stats.new_tokens for result in results)
    return {
        "prompts": len(results),
        "tokens_per_second": decode_rate(results),
        "tar": accepted / drafted if drafted else None,
        "mean_accepted_length": tokens / forwards if forwards else None,
        "draft_seconds_per_forward": (
            sum(result.stats.draft_seconds for result in results) / draft_forwards if draft_forwards else None
        ),
        "verify_seconds_per_forward": sum(result.stats.verify_seconds for result in results) / max(1, forwards),
    }


def identical_share(first: Sequence[GenerationResult], second: Sequence[GenerationResult]) -> float:
    return sum(a.token_ids == b.token_ids for a, b in zip(first, second, strict=True)) / len(first)


def top2_gaps(
    model: PreTrainedModel, prompts: Sequence[list[int]], alone: Sequence[GenerationResult], other: Sequence
) -> list[dict]:
    """For each output that differs from decoding alone: the first differing index and the target's gap between its
    two largest logits there (a full forward over prompt + common prefix, in the model's dtype)."""
    gaps = []
    for index, (prompt, reference, result) in enumerate(zip(prompts, alone, other, strict=True)):
        if reference.token_ids == result.token_ids:
            continue
        first = next(i for i, (a, b) in enumerate(zip(reference.token_ids, result.token_ids, strict=False)) if a != b)
        context = torch.tensor(prompt + reference.token_ids[:first], device=model.device).view(1, -1)
        with torch.inference_mode():
            top = model(input_ids=context).logits[0, -1].float().topk(2).values
        gaps.append({"prompt": index, "first_difference": first, "top2_logit_gap": float(top[0] - top[1])})
    return gaps


def best_gamma(decoder: SpeculativeDecoder, prompts: Sequence[list[int]], settings: Settings, temperature: float):
    """The γ with the best decode rate on the tuning prompts, each γ first run once untimed: a new step width means
    new CUDA graphs and, with the Triton kernels, new kernel variants to compile (the attention kernel's tile height
    follows the step's width), which on the H200 made the first γ tried look 7x slower than the others."""
    gammas = GAMMAS[:2] if settings.quick else GAMMAS
    for gamma in gammas:
        run_prompts(decoder, prompts[:1], settings.new_tokens, gamma=gamma, temperature=temperature)
    rates = {
        gamma: decode_rate(run_prompts(decoder, prompts, settings.new_tokens, gamma=gamma, temperature=temperature))
        for gamma in gammas
    }
    return max(rates, key=rates.get), rates


def hf_timed_generate(
    model: PreTrainedModel, prompt: torch.Tensor, new_tokens: int, temperature: float, extra: dict
) -> tuple[float, list[int]]:
    """(seconds, generated ids) of one HF `generate` call."""
    synchronize(model.device)
    began = time.perf_counter()
    output = hf_generate(model, prompt, new_tokens, temperature, **extra)
    return time.perf_counter() - began, output


def measure_hf(
    decoder: SpeculativeDecoder,
    draft: PreTrainedModel,
    prompts: Sequence[list[int]],
    settings: Settings,
    temperature: float,
) -> dict:
    """HF generate alone, with assisted generation (HF's default schedule) and with prompt lookup (4 tokens)."""
    model, device = decoder.target.model, settings.device
    paths = {
        "hf_ar": {},
        "hf_assisted": {"assistant_model": draft},
        "hf_prompt_lookup": {"prompt_lookup_num_tokens": 4},
    }
    found = {}
    for name, extra in paths.items():
        tensors = [torch.tensor(prompt, device=device) for prompt in prompts]
        hf_generate(model, tensors[0], 4, temperature, **extra)
        seconds, outputs = 0.0, []
        for tensor in tensors:
            one, _ = hf_timed_generate(model, tensor, 1, temperature, extra)
            full, output = hf_timed_generate(model, tensor, settings.hf_new_tokens, temperature, extra)
            seconds += max(full - one, 1e-9)
            outputs.append(output)
        rate = len(tensors) * (settings.hf_new_tokens - 1) / seconds
        found[name] = {"tokens_per_second": rate, "outputs": outputs}
    assistant = draft.generation_config
    found["hf_assisted"]["schedule"] = {
        "num_assistant_tokens": assistant.num_assistant_tokens,
        "num_assistant_tokens_schedule": assistant.num_assistant_tokens_schedule,
        "assistant_confidence_threshold": getattr(assistant, "assistant_confidence_threshold", None),
    }
    return found


def leviathan(summary: dict, gamma: int, ar_summary: dict) -> dict:
    """Predicted speedup E/(γc+1) from the run's own TAR (α via `alpha_from_tar`) and c from its step times."""
    tar = summary["tar"] or 0.0
    alpha = alpha_from_tar(min(max(tar, 0.0), 1.0), gamma)
    cost = summary["draft_seconds_per_forward"] / ar_summary["verify_seconds_per_forward"]
    predicted = predicted_speedup(alpha, gamma, cost)
    measured = summary["tokens_per_second"] / ar_summary["tokens_per_second"]
    return {
        "alpha": alpha,
        "cost_ratio": cost,
        "predicted_speedup": predicted,
        "measured_speedup": measured,
        "measured_over_predicted": measured / predicted,
    }


def measure_family(family: Family, settings: Settings, found: dict) -> None:
    """Every measurement of parts c and d on one family (target plus drafts), filled into `found` as it goes so
    that a run stopped early still leaves what it measured."""
    from speculor.prompts import load_prompts

    device = settings.device
    texts = load_prompts("humaneval", limit=settings.prompt_limit)
    decoders = {
        name: SpeculativeDecoder(family.target, path, device=device, dtype=settings.dtype, runner="fast")
        for name, path in family.drafts.items()
    }
    first = next(iter(decoders.values()))
    prompts = [first.encode(text) for text in texts]
    subset = prompts[: settings.hf_prompts]
    found.update(family=family.name, target=family.target, drafts=family.drafts, prompts=len(prompts))
    found["new_tokens"] = settings.new_tokens
    found["hf_prompts"], found["hf_new_tokens"] = len(subset), settings.hf_new_tokens
    found["temperatures"] = {}
    for temperature in TEMPERATURES:
        run: dict = {}
        found["temperatures"][str(temperature)] = run
        run_prompts(first, prompts[:2], settings.new_tokens, speculative=False, temperature=temperature)
        alone = run_prompts(first, prompts, settings.new_tokens, speculative=False, temperature=temperature)
        run["speculor_ar"] = summarize(alone)
        speculative = {}
        for name, decoder in decoders.items():
            gamma, rates = best_gamma(decoder, prompts[: settings.tune_prompts], settings, temperature)
            results = run_prompts(decoder, prompts, settings.new_tokens, gamma=gamma, temperature=temperature)
            entry = summarize(results) | {"gamma": gamma, "tuning_tokens_per_second": rates}
            entry["speedup_vs_speculor_ar"] = entry["tokens_per_second"] / run["speculor_ar"]["tokens_per_second"]
            entry["leviathan"] = leviathan(entry, gamma, run["speculor_ar"])
            if temperature == 0:
                entry["greedy_identical_share"] = identical_share(alone, results)
                entry["divergences"] = top2_gaps(first.target.model, prompts, alone, results)
            speculative[name] = entry
        run["speculor_speculative"] = speculative
        settings.say(f"{family.name}: speculor runs at T={temperature} done")
        best = max(speculative, key=lambda name: speculative[name]["tokens_per_second"])
        run["best_draft"] = best
        short = dict(temperature=temperature, gamma=speculative[best]["gamma"])
        run["speculor_on_hf_subset"] = {
            "ar": decode_rate(run_prompts(first, subset, settings.hf_new_tokens, speculative=False, **short)),
            best: decode_rate(run_prompts(decoders[best], subset, settings.hf_new_tokens, **short)),
        }
        hf = measure_hf(first, decoders[best].draft.model, subset, settings, temperature)
        if temperature == 0:
            for name in ("hf_assisted", "hf_prompt_lookup"):
                hf[name]["greedy_identical_to_hf_ar"] = sum(
                    a == b for a, b in zip(hf["hf_ar"]["outputs"], hf[name]["outputs"], strict=True)
                ) / len(subset)
        for entry in hf.values():
            entry.pop("outputs", None)
        run["hf"] = hf
        best_subset = run["speculor_on_hf_subset"][best]
        run["speedups_on_subset"] = {
            "speculor_speculative_vs_hf_assisted": best_subset / hf["hf_assisted"]["tokens_per_second"],
            "speculor_speculative_vs_hf_ar": best_subset / hf["hf_ar"]["tokens_per_second"],
            "speculor_ar_vs_hf_ar": run["speculor_on_hf_subset"]["ar"] / hf["hf_ar"]["tokens_per_second"],
            "hf_assisted_vs_hf_ar": hf["hf_assisted"]["tokens_per_second"] / hf["hf_ar"]["tokens_per_second"],
            "hf_prompt_lookup_vs_hf_ar": hf["hf_prompt_lookup"]["tokens_per_second"] / hf["hf_ar"]["tokens_per_second"],
        }
        settings.say(f"{family.name}: HF runs at T={temperature} done")
    found["identity"] = identity_checks(family, found, prompts[: settings.identity_prompts], settings)
    del decoders, first
    free_memory()


def identity_checks(family: Family, found: dict, prompts: Sequence[list[int]], settings: Settings) -> dict:
    """Greedy speculative against greedy alone with the best draft: in float32, and in bfloat16 with the target
    runner's uniform rounding (`fixed_width` = γ + 1), whose cost is the AR and speculative decode rates."""
    greedy = found["temperatures"]["0.0"]
    best = greedy["best_draft"]
    gamma = greedy["speculor_speculative"][best]["gamma"]
    checks = {"draft": best, "gamma": gamma, "prompts": len(prompts)}
    exact = SpeculativeDecoder(
        family.target, family.drafts[best], device=settings.device, dtype=torch.float32, runner="fast"
    )
    alone = run_prompts(exact, prompts, settings.new_tokens, speculative=False)
    speculative = run_prompts(exact, prompts, settings.new_tokens, gamma=gamma)
    checks["float32_identical_share"] = identical_share(alone, speculative)
    checks["float32_divergences"] = top2_gaps(exact.target.model, prompts, alone, speculative)
    del exact
    uniform = SpeculativeDecoder(
        family.target, family.drafts[best], device=settings.device, dtype=settings.dtype, runner="fast"
    )
    uniform.target_runner = FastRunner(uniform.target.model, max_cache_length=1024, fixed_width=gamma + 1)
    run_prompts(uniform, prompts[:2], settings.new_tokens, speculative=False)
    alone = run_prompts(uniform, prompts, settings.new_tokens, speculative=False)
    speculative = run_prompts(uniform, prompts, settings.new_tokens, gamma=gamma)
    checks["uniform_bfloat16_identical_share"] = identical_share(alone, speculative)
    checks["uniform_ar_tokens_per_second"] = decode_rate(alone)
    checks["uniform_speculative_tokens_per_second"] = decode_rate(speculative)
    del uniform
    free_memory()
    return checks


def part_c(settings: Settings, found: dict) -> None:
    measure_family(train_pair(settings), settings, found)


def part_d(settings: Settings, found: dict) -> None:
    measure_family(shipped_family(), settings, found)


# ---------------------------------------------------------------------------------------------------- part e


def batch_step_milliseconds(runner: FastRunner, lengths: Sequence[int], batch: int, width: int, repeats: int) -> float:
    """Milliseconds per step of `width` tokens on each of slots 0..batch-1 (every slot rolled back to its prompt
    after each step, as a verify does after a rejection), median of three bursts of `repeats` steps."""
    slots = list(range(batch))
    tokens = torch.arange(batch * width, device=runner.device).view(batch, width) % runner.vocab_size

    def burst() -> None:
        for _ in range(repeats):
            runner.step(slots, tokens)
            for slot in slots:
                runner.rollback(slot, lengths[slot])

    burst()
    return statistics.median(timed(runner.device, burst) for _ in range(3)) / repeats * 1e3


def batch_decode_rate(runner: FastRunner, prompts: Sequence[torch.Tensor], batch: int, new_tokens: int) -> float:
    """AR decode tokens/s of a plain loop of one-token steps over `batch` rows, each row's argmax fed back (on the
    device, no host read per step); the prompts' last tokens are the first inputs."""
    slots = list(range(batch))
    for slot in slots:
        runner.rollback(slot, prompts[slot].numel() - 1)
    first = torch.stack([prompts[slot][-1:] for slot in slots])

    def decode() -> None:
        pending = first
        for _ in range(new_tokens):
            pending = runner.step(slots, pending).argmax(-1)
        for slot in slots:
            runner.rollback(slot, prompts[slot].numel() - 1)

    decode()
    return batch * new_tokens / timed(runner.device, decode)


def hf_batch_decode_rate(model: PreTrainedModel, prompts: Sequence[torch.Tensor], new_tokens: int) -> float:
    """HF `generate` greedy on the prompts as one left-padded batch: rows · (n − 1) tokens over the time of n new
    tokens minus the time of one."""
    width = max(prompt.numel() for prompt in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=model.device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.numel() :] = prompt
        mask[row, width - prompt.numel() :] = 1

    def generate(count: int) -> None:
        options = dict(max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=0)
        model.generate(input_ids=ids, attention_mask=mask, **options)

    generate(2)
    one = statistics.median(timed(model.device, lambda: generate(1)) for _ in range(3))
    many = timed(model.device, lambda: generate(new_tokens))
    return len(prompts) * (new_tokens - 1) / (many - one)


def stored_batch_one_steps() -> dict[str, dict[str, float]]:
    """Part b's fast-runner step times (ms by k) per shape from `STORED_PART_B`, or {} when it is missing."""
    try:
        shapes = json.loads(STORED_PART_B.read_text())["parts"]["b"]["shapes"]
    except (OSError, KeyError, ValueError):
        return {}
    return {name: shape["fast_step_ms"] for name, shape in shapes.items()}


def part_e(settings: Settings, found: dict, shapes: dict[str, PretrainedConfig]) -> None:
    """The batched fast runner, runner level (no engine), on each of `shapes`: see the module docstring. Prompts of
    different lengths (half to all of `random_prompt_tokens`; slot 0 the longest), so each row attends over its own
    length."""
    device = settings.device
    batches = BATCH_SIZES[:3] if settings.quick else BATCH_SIZES
    widths = ROW_WIDTHS[:3] if settings.quick else ROW_WIDTHS
    stored = stored_batch_one_steps() if device.type == "cuda" and not settings.quick else {}
    found.update(batch_sizes=list(batches), widths=list(widths), shapes={})
    found["stored_part_b"] = STORED_PART_B.name if stored else None
    for name, config in shapes.items():
        model = random_model(config, device, settings.dtype)
        generator = torch.Generator().manual_seed(2)
        longest = settings.random_prompt_tokens
        others = torch.randint(longest // 2, longest + 1, (max(batches) - 1,), generator=generator).tolist()
        lengths = [longest, *others]
        prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).to(device) for n in lengths]
        capacity = longest + settings.random_new_tokens + max(widths)
        runner = FastRunner(model, slots=max(batches), max_cache_length=capacity)
        entry: dict = {"fused_kernels": runner.fused is not None, "slots": runner.slots, "cache_length": capacity}
        found["shapes"][name] = entry
        entry["warm_up_seconds"] = timed(device, lambda runner=runner: runner.warm_up(widths))
        entry["graphs"] = runner.graph_count
        for slot, prompt in enumerate(prompts):
            runner.extend(slot, prompt)
        entry["step_ms"] = {
            batch: {
                width: batch_step_milliseconds(runner, lengths, batch, width, settings.step_repeats) for width in widths
            }
            for batch in batches
        }
        entry["graphs_after_steps"] = runner.graph_count
        settings.say(f"e: {name} step times done")
        entry["ar_tokens_per_second"] = {
            batch: batch_decode_rate(runner, prompts, batch, settings.random_new_tokens) for batch in batches
        }
        del runner
        free_memory()
        entry["hf_generate_tokens_per_second"] = {
            batch: hf_batch_decode_rate(model, prompts[:batch], settings.hf_new_tokens) for batch in batches
        }
        before = stored.get(name, {})
        entry["batch_one_step_ms_stored"] = {width: before[str(width)] for width in widths if str(width) in before}
        entry["batch_one_stored_over_now"] = {
            width: ms / entry["step_ms"][1][width] for width, ms in entry["batch_one_step_ms_stored"].items()
        }
        settings.say(f"e: {name} done")
        del model
        free_memory()


# ---------------------------------------------------------------------------------------------------- report


def percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def number(value: float | None, digits: int = 1) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        f"# speculor GPU benchmark — {report['date']}, {report['device_name']}",
        "",
        f"`{report['command']}` · torch {report['torch']} · transformers {report['transformers']}",
        "",
    ]
    if "a" in report["parts"]:
        a = report["parts"]["a"]
        if "skipped" in a:
            lines += [f"**a** skipped: {a['skipped']}", ""]
        else:
            lines += [
                f"**a** copy bandwidth {a['copy_bandwidth_bytes_per_second'] / 1e12:.2f} TB/s (read + write)",
                "",
                "| shape | weights | read per forward | floor per token | floor tok/s |",
                "|---|---|---|---|---|",
            ]
            for name, shape in a["shapes"].items():
                lines.append(
                    f"| {name} | {shape['weight_bytes'] / 1e9:.2f} GB | {shape['bytes_read_per_forward'] / 1e9:.2f} GB"
                    f" | {shape['floor_ms']:.2f} ms | {shape['floor_tokens_per_second']:.0f} |"
                )
            lines.append("")
    if "b" in report["parts"]:
        lines += markdown_b(report["parts"]["b"])
    for part in ("c", "d"):
        if part in report["parts"]:
            try:
                lines += markdown_family(part, report["parts"][part])
            except KeyError:
                lines += [f"**{part}** incomplete: what it measured is in gpu.json", ""]
    for part in ("e", "f"):
        if part in report["parts"]:
            try:
                lines += markdown_e(part, report["parts"][part])
            except KeyError:
                lines += [f"**{part}** incomplete: what it measured is in gpu.json", ""]
    if report["notes"]:
        lines += ["Notes:", *[f"- {note}" for note in report["notes"]], ""]
    return "\n".join(lines)


def markdown_b(b: dict) -> list[str]:
    if "skipped" in b:
        return [f"**b** skipped: {b['skipped']}", ""]
    widths = " | ".join(f"k={k}" for k in VERIFY_WIDTHS)
    lines = [
        "**b** random weights (bf16 on a GPU), decode tok/s (share of the floor); ms per step by tokens per step",
        "",
        f"| shape | HF generate | speculor AR | speculor AR, torch kernels | runner | {widths} |",
        "|---|---|---|---|---|" + "---|" * len(VERIFY_WIDTHS),
    ]
    for name, shape in b["shapes"].items():
        for runner in ("fast", "fast_torch_kernels", "hf"):
            steps = " | ".join(number(shape[f"{runner}_step_ms"][k], 2) for k in VERIFY_WIDTHS)
            floor_share = shape.get("speculor_ar_share_of_floor")
            plain_rate = shape["speculor_ar_torch_kernels_tokens_per_second"]
            plain_share = floor_share * plain_rate / shape["speculor_ar_tokens_per_second"] if floor_share else None
            rates = (
                f"{number(shape['hf_generate_tokens_per_second'])} ({percent(shape.get('hf_share_of_floor'))}) | "
                f"{number(shape['speculor_ar_tokens_per_second'])} ({percent(floor_share)}) | "
                f"{number(plain_rate)} ({percent(plain_share)})"
                if runner == "fast"
                else " | | "
            )
            lines.append(f"| {name if runner == 'fast' else ''} | {rates} | {runner} | {steps} |")
    lines.append("")
    fused = any(shape.get("fused_kernels") for shape in b["shapes"].values())
    lines.append(f"fast runner kernels: {'fused Triton' if fused else 'plain torch (no Triton or no CUDA)'}")
    overheads = ", ".join(
        f"{name} {1e3 / shape['speculor_ar_tokens_per_second'] - shape['fast_step_ms'][1]:.2f} ms"
        for name, shape in b["shapes"].items()
    )
    lines.append(f"decode loop overhead per token (AR time per token − captured k=1 step): {overheads}")
    for pair, ratios in b["cost_ratios"].items():
        lines.append(f"cost ratio c ({pair}, k=1): fast runner {ratios['fast']:.3f}, HF runner {ratios['hf']:.3f}")
    for name, shape in b["shapes"].items():
        modes = shape.get("capture_modes")
        if modes:
            described = ", ".join(
                f"{mode} {number(value.get('step_ms'), 2)} ms/step "
                f"(first call {number(value.get('first_call_seconds'), 2)} s)"
                if "error" not in value
                else f"{mode} failed: {value['error'][:120]}"
                for mode, value in modes.items()
            )
            lines.append(f"step modes, {name}, k=1: {described}")
    for name, shape in b["shapes"].items():
        for key, runner in (("kernel_profile", "fast"), ("kernel_profile_torch_kernels", "fast_torch_kernels")):
            profile = shape.get(key)
            if profile and "error" not in profile:
                top = "; ".join(
                    f"{item['kernel'][:50]} {item['ms']:.3f} ms ×{item['count']}" for item in profile["top"][:8]
                )
                lines.append(
                    f"{name} ({runner}) eager k=1 step under the profiler: {profile['kernels_per_step']} kernels, "
                    f"{profile['kernel_time_ms']:.2f} ms of kernel time (captured step: "
                    f"{shape[f'{runner}_step_ms'][1]:.2f} ms); top: {top}"
                )
            elif profile:
                lines.append(f"{name} ({runner}) profiler failed: {profile['error'][:160]}")
    for name, shape in b["shapes"].items():
        loop = shape.get("loop_profile")
        if loop and "error" not in loop:
            top = "; ".join(
                f"{item['operation']} ×{item['count']} {item['us_per_step']:.0f} µs/step"
                for item in loop["top_host_operations"][:8]
            )
            lines.append(f"{name} decode loop under the profiler ({loop['wall_ms_per_step']:.2f} ms/step): {top}")
    agreement = b["logits_agreement"]
    lines += [
        "logits vs transformers (1B shape, prefill then 5 tokens): "
        + ", ".join(f"{key} {value:.2e}" for key, value in agreement.items()),
        "",
    ]
    return lines


def markdown_e(part: str, e: dict) -> list[str]:
    if "skipped" in e:
        return [f"**{part}** skipped: {e['skipped']}", ""]
    widths = " | ".join(f"k={k}" for k in e["widths"])
    lines = [
        f"**{part}** batched fast runner (random weights, bf16 on a GPU): ms per step by rows B and tokens per row k; "
        "AR decode tok/s summed over rows, speculor loop and HF `generate` (left-padded batch)",
        "",
        f"| shape | B | {widths} | speculor AR tok/s | HF generate tok/s |",
        "|---|---|" + "---|" * len(e["widths"]) + "---|---|",
    ]
    for name, shape in e["shapes"].items():
        for batch in e["batch_sizes"]:
            steps = " | ".join(number(shape["step_ms"][batch][k], 2) for k in e["widths"])
            ar = number(shape.get("ar_tokens_per_second", {}).get(batch))
            hf = number(shape.get("hf_generate_tokens_per_second", {}).get(batch))
            lines.append(f"| {name if batch == e['batch_sizes'][0] else ''} | {batch} | {steps} | {ar} | {hf} |")
    lines.append("")
    for name, shape in e["shapes"].items():
        ratios = ", ".join(f"k={k} {ratio:.3f}" for k, ratio in shape.get("batch_one_stored_over_now", {}).items())
        lines.append(
            f"{name}: warm-up {shape['warm_up_seconds']:.1f} s for {shape['graphs']} graphs "
            f"({shape['graphs_after_steps']} after every step shape ran); batch 1, stored part b step time over "
            f"now (≥ 1: no slower): {ratios or '—'}"
        )
    return [*lines, ""]


def markdown_family(part: str, found: dict) -> list[str]:
    if "skipped" in found:
        return [f"**{part}** skipped: {found['skipped']}", ""]
    lines = [
        f"**{part}** {found['family']} family on HumanEval ({found['prompts']} prompts for speculor, "
        f"{found['new_tokens']} new tokens each; HF paths and the 'on the subset' ratios on the first "
        f"{found['hf_prompts']} prompts, {found['hf_new_tokens']} new tokens), decode tok/s",
        "",
        "| T | path | γ | tok/s | TAR | mean accepted | vs speculor AR | predicted | measured/predicted | "
        "greedy identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for temperature, run in found["temperatures"].items():
        ar = run["speculor_ar"]
        lines.append(f"| {temperature} | speculor AR | — | {number(ar['tokens_per_second'])} | | | 1.00x | | | |")
        for name, entry in run["speculor_speculative"].items():
            lev = entry["leviathan"]
            lines.append(
                f"| {temperature} | speculor + {name} | {entry['gamma']} | {number(entry['tokens_per_second'])} | "
                f"{number(entry['tar'], 3)} | {number(entry['mean_accepted_length'], 2)} | "
                f"{entry['speedup_vs_speculor_ar']:.2f}x | {lev['predicted_speedup']:.2f}x "
                f"(α {lev['alpha']:.2f}, c {lev['cost_ratio']:.2f}) | {percent(lev['measured_over_predicted'])} | "
                f"{percent(entry.get('greedy_identical_share'))} |"
            )
        for name, entry in run["hf"].items():
            identical = percent(entry.get("greedy_identical_to_hf_ar"))
            lines.append(
                f"| {temperature} | {name} (subset) | | {number(entry['tokens_per_second'])} | | | | | | {identical} |"
            )
        ratios = ", ".join(f"{key} {value:.2f}x" for key, value in run["speedups_on_subset"].items())
        lines += [f"| {temperature} | on the subset: {ratios} | | | | | | | | |"]
    identity = found["identity"]
    lines += [
        "",
        f"greedy identity, draft {identity['draft']}, γ={identity['gamma']}, {identity['prompts']} prompts: "
        f"float32 {percent(identity['float32_identical_share'])}; bf16 with uniform rounding (fixed_width) "
        f"{percent(identity['uniform_bfloat16_identical_share'])} at AR "
        f"{number(identity['uniform_ar_tokens_per_second'])} tok/s and speculative "
        f"{number(identity['uniform_speculative_tokens_per_second'])} tok/s",
        "",
    ]
    return lines


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="a,b,c,d,e,f", help="comma-separated subset of a,b,c,d,e,f")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of every code path")
    parser.add_argument("--out", default="benchmarks/results/gpu", help="directory for gpu.json and gpu.md")
    parser.add_argument("--family-dir", help="where part c trains (or finds) its family (default: OUT/family)")
    parser.add_argument("--train-seconds", type=float, default=120.0, help="part c target training time")
    parser.add_argument("--draft-seconds", type=float, default=30.0, help="part c training time per draft")
    parser.add_argument("--max-corpus-bytes", type=int, default=64 << 20, help="part c corpus cap")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--compare-capture", action="store_true", help="part b: also time eager and torch.compile")
    parser.add_argument("--target-shape", default="32x576", help="part c target, LAYERSxWIDTH")
    parser.add_argument("--new-tokens", type=int, default=64, help="parts c, d: new tokens per speculor prompt")
    parser.add_argument("--hf-prompts", type=int, default=32, help="parts c, d: prompts for the HF paths")
    parser.add_argument("--hf-new-tokens", type=int, default=16, help="parts c, d: new tokens per HF prompt")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown parts {unknown}: choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        quick=args.quick,
        device=device,
        out=out,
        family_dir=Path(args.family_dir) if args.family_dir else out / "family",
        train_seconds=args.train_seconds,
        draft_seconds=args.draft_seconds,
        max_corpus_bytes=args.max_corpus_bytes,
        compare_capture=args.compare_capture,
        target_shape=args.target_shape,
        new_tokens=args.new_tokens,
        hf_prompts=args.hf_prompts,
        hf_new_tokens=args.hf_new_tokens,
    )
    import transformers

    report = {
        "date": datetime.date.today().isoformat(),
        **source_revision(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "command": shlex.join(["python", "benchmarks/gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parts": {},
        "notes": settings.notes,
        "seconds": {},
    }

    def save() -> None:
        (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "gpu.md").write_text(markdown(report) + "\n")

    settings.save = save
    runners = {
        "a": lambda found: found.update(part_a(settings)),
        "b": lambda found: found.update(part_b(settings, report["parts"].get("a", {}).get("shapes", {}))),
        "c": lambda found: part_c(settings, found),
        "d": lambda found: part_d(settings, found),
        "e": lambda found: part_e(
            settings, found, {name: llama_shapes(settings.quick)[name] for name in SHAPE_PAIRS[0]}
        ),
        "f": lambda found: part_e(settings, found, gemma2_shapes(settings.quick)),
    }
    for part in PARTS:
        if part not in parts:
            continue
        began = time.perf_counter()
        found: dict = {}
        report["parts"][part] = found
        try:
            runners[part](found)
        except ImportError as error:
            found["skipped"] = f"a dependency is missing ({error})"
        except Exception as error:  # record and go on: the other parts are still worth having
            traceback.print_exc()
            found["skipped"] = f"failed: {type(error).__name__}: {error}"
        report["seconds"][part] = time.perf_counter() - began
        free_memory()
        settings.say(f"part {part} done")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
