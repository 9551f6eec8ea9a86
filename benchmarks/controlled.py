"""Speculation at a realistic scale with a chosen acceptance: the Llama-3-8B shape (random bf16 weights) as target, and
a benchmark-only draft that proposes the target's own greedy continuation (computed first by the target alone) with
a chosen per-token acceptance, while costing what a Llama-3.2-1B-shaped draft costs (it runs that draft's forwards
and throws their tokens away).

    python benchmarks/controlled.py --out OUT                                   # on cuda, a few minutes
    python benchmarks/controlled.py --device cpu --quick --out /tmp/controlled-smoke

Random weights never accept a real draft's tokens, so a random pair says what speculation costs but not what it
wins. Here each drafted token is the target's own next token with probability `--acceptance` (drawn once per row
and position, so every configuration sees the same coin flips) and otherwise a wrong one. For every batch size B,
side by side on the same B prompts (128 random tokens each, forced length): the target alone (AR) through the same
engine, each fixed γ in `--gammas` and the default (load-aware) γ. Reported: tokens/s, ms per target forward, the
measured acceptance and each configuration's ratio to AR. In bf16 the target's own tokens at a verify width can
differ from its tokens decoded alone (a near-tie rounded differently); a row whose context has so diverged is no
longer proposed its continuation, which the measured acceptance shows. JSON after every batch size.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from gpu import llama_shapes, random_model

from speculor.api import SpeculativeDecoder
from speculor.proposers import DraftModelProposer, Proposal
from speculor.provenance import measurement_header
from speculor.runners.fast import host_to_device
from speculor.sampling import RowSampling


class ControlledProposer(DraftModelProposer):
    """A draft model's forwards with the target's own tokens in place of the draft's.

    `truth[slot]` is the slot's whole sequence as the target alone generates it, and `hits[slot, position]` whether
    the token proposed for that position is the true one (else the true one + 1). A row's context length is kept on
    the device (`_lengths`): set from the host on a plain proposal, advanced by the accepted count on a chained
    one, so the chained path runs without a host read as the real draft's does."""

    def __init__(self, runner, vocab_size: int, slots: int, length: int, acceptance: float, seed: int) -> None:
        super().__init__(runner, vocab_size)
        device = runner.device
        self.truth = torch.zeros(slots, length, dtype=torch.long, device=device)
        generator = torch.Generator().manual_seed(seed)
        self.hits = (torch.rand(slots, length, generator=generator) < acceptance).to(device)
        self._lengths = torch.zeros(slots, dtype=torch.long, device=device)

    def load(self, sequences: Sequence[list[int]]) -> None:
        """The target alone's sequences (prompt + continuation), one per slot from 0."""
        self.truth.zero_()
        for slot, sequence in enumerate(sequences):
            self.truth[slot, : len(sequence)] = torch.tensor(sequence, device=self.truth.device)

    def propose(self, slots, contexts, gammas, sampling, confidence_thresholds) -> Proposal:
        index = host_to_device(list(slots), self.truth.device)
        self._lengths[index] = host_to_device([len(context) for context in contexts], self.truth.device)
        return self._replace(index, super().propose(slots, contexts, gammas, sampling, confidence_thresholds))

    def propose_chained(
        self,
        slots: Sequence[int],
        previous: torch.Tensor,
        accepted: torch.Tensor,
        next_tokens: torch.Tensor,
        gamma: int,
        counts: torch.Tensor,
        sampling: RowSampling,
        positions: torch.Tensor | None,
    ) -> Proposal:
        index = host_to_device(list(slots), self.truth.device)
        self._lengths[index] += accepted + 1
        proposal = super().propose_chained(slots, previous, accepted, next_tokens, gamma, counts, sampling, positions)
        return self._replace(index, proposal)

    def _replace(self, index: torch.Tensor, proposal: Proposal) -> Proposal:
        width = proposal.tokens.shape[1]
        at = (self._lengths[index][:, None] + torch.arange(width, device=index.device)).clamp(
            max=self.truth.shape[1] - 1
        )
        true = self.truth[index[:, None], at]
        tokens = torch.where(self.hits[index[:, None], at], true, (true + 1) % self.vocab_size)
        return Proposal(tokens, proposal.counts, None, proposal.forwards, proposal.caught_up)


def timed(decoder: SpeculativeDecoder, prompts: list[list[int]], tokens: int, **options) -> dict:
    synchronize(decoder.device)
    began = time.perf_counter()
    results = decoder.generate(prompts, max_new_tokens=tokens, ignore_eos=True, **options)
    synchronize(decoder.device)
    wall = time.perf_counter() - began
    drafted = sum(result.stats.drafted for result in results)
    gamma_steps: dict[int, int] = {}
    for result in results:
        for gamma, count in result.stats.gamma_steps.items():
            gamma_steps[gamma] = gamma_steps.get(gamma, 0) + count
    return {
        "wall_seconds": wall,
        "tokens_per_second": len(prompts) * tokens / wall,
        "ms_per_target_forward": 1000 * wall / max(result.stats.target_forwards for result in results),
        "acceptance_rate": sum(result.stats.accepted for result in results) / drafted if drafted else None,
        "gamma_steps": dict(sorted(gamma_steps.items())),
        "token_ids": [result.token_ids for result in results],
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--gammas", default="2,4")
    parser.add_argument("--acceptance", type=float, default=0.8, help="chance a drafted token is the target's own")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--commit", help="the commit being measured, where the checkout has no git metadata")
    parser.add_argument("--quick", action="store_true", help="a smoke test: toy shapes, batch 1 and 2, 12 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.max_new_tokens, args.repeats = "1,2", 12, 1
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    gammas = [int(gamma) for gamma in args.gammas.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = llama_shapes(args.quick)
    target = random_model(shapes["llama-3-8b"], device, dtype)
    decoder = SpeculativeDecoder(
        target,
        random_model(shapes["llama-3.2-1b"], device, dtype),
        device=device,
        dtype=dtype,
        max_batch_size=max(sizes),
    )
    vocab = decoder.target_runner.vocab_size
    proposer = ControlledProposer(
        decoder.draft_runner, vocab, max(sizes), 128 + args.max_new_tokens + 16, args.acceptance, seed=0
    )
    original_proposer = decoder._proposer
    decoder._proposer = lambda: proposer
    decoder.warm_up(max(gammas))
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(vocab, (max(sizes), 128), generator=generator).tolist()
    report = {
        **measurement_header(device, args.commit),
        "shapes": "llama-3-8b target, llama-3.2-1b draft forwards, random weights",
        "acceptance_set": args.acceptance,
        "max_new_tokens": args.max_new_tokens,
        "batches": [],
    }
    configurations = {"ar": {"speculative": False}}
    configurations.update({f"gamma_{gamma}": {"gamma": gamma} for gamma in gammas})
    configurations["default"] = {}
    for size in sizes:
        batch = prompts[:size]
        alone = timed(decoder, batch, args.max_new_tokens + 8, speculative=False)
        proposer.load([prompt + ids for prompt, ids in zip(batch, alone["token_ids"], strict=True)])
        entry: dict = {"batch_size": size}
        for name, options in configurations.items():
            timed(decoder, batch, args.max_new_tokens, **options)
            runs = [timed(decoder, batch, args.max_new_tokens, **options) for _ in range(args.repeats)]
            entry[name] = sorted(runs, key=lambda run: run["wall_seconds"])[len(runs) // 2]
            entry[name].pop("token_ids")
        for name in configurations:
            entry[name]["vs_ar"] = entry[name]["tokens_per_second"] / entry["ar"]["tokens_per_second"]
        report["batches"].append(entry)
        (args.out / "controlled.json").write_text(json.dumps(report, indent=2) + "\n")
        cells = " | ".join(
            f"{name} {entry[name]['vs_ar']:.2f}x (TAR {entry[name]['acceptance_rate'] or 0:.2f})"
            for name in configurations
            if name != "ar"
        )
        print(
            f"B={size:>3} AR {entry['ar']['tokens_per_second']:8.1f} tok/s, "
            f"{entry['ar']['ms_per_target_forward']:.2f} ms/forward | {cells} | default γ steps "
            f"{entry['default']['gamma_steps']}",
            flush=True,
        )
    decoder._proposer = original_proposer
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
