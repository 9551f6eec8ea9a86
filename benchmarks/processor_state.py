"""What making a batch's logits processors costs per speculative step: `RowProcessors.build` from the rows' whole
contexts (what the engine did every step) against `ProcessorState.update` (what it does now: the parts that last
while the rows stay made once, the output counts advanced by each step's new tokens).

    python benchmarks/processor_state.py                       # CPU, rows 16 64, V 32000 128256, one thread
    python benchmarks/processor_state.py --device cuda --rows 64 --vocab 128256 --steps 50

Every row has every tensor option on (presence, frequency and repetition penalties, an 8-token logit bias,
min_tokens, banned words of 1, 2 and 3 tokens), a 512-token prompt and 128 generated tokens; each step appends 3
tokens to every row (γ = 2, all accepted). Reported, per step (median over the steps): `build`, the from-scratch
way; `update`, the same rows stepped on; `churn`, the update when one row leaves and a new one (512 + 128 tokens)
joins at every step, the worst case of continuous batching, where the rows that stay are carried over and only the
new one is counted from its context. A fresh state's first update (`first`, median of 3) is timed apart. The last
result of each phase is checked against `RowProcessors.build`, so equal results are compared. On CUDA each timing
waits for the device. Times are milliseconds; ratios are build ÷ update and build ÷ churn.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from speculor.processors import ProcessorState, RowProcessors
from speculor.sampling import SamplingParams

PROMPT_TOKENS = 512
GENERATED_TOKENS = 128
ADVANCE = 3


def row_options(rng: random.Random, vocab: int) -> SamplingParams:
    return SamplingParams(
        presence_penalty=0.5,
        frequency_penalty=0.3,
        repetition_penalty=1.1,
        logit_bias={rng.randrange(vocab): rng.uniform(-5, 5) for _ in range(8)},
        min_tokens=4,
        bad_words=[[rng.randrange(vocab)], [rng.randrange(vocab), rng.randrange(vocab)], [1, 2, 3]],
    )


class Batch:
    """Rows of random contexts, keyed by a running number."""

    def __init__(self, rows: int, vocab: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab
        self.next_key = 0
        self.rows: dict[int, tuple[SamplingParams, list[int], list[int], frozenset[int]]] = {}
        for _ in range(rows):
            self.join()

    def join(self) -> None:
        rng, vocab = self.rng, self.vocab
        prompt = [rng.randrange(vocab) for _ in range(PROMPT_TOKENS)]
        output = [rng.randrange(vocab) for _ in range(GENERATED_TOKENS)]
        self.rows[self.next_key] = (row_options(rng, vocab), prompt, output, frozenset({0, vocab - 1}))
        self.next_key += 1

    def leave(self) -> None:
        del self.rows[next(iter(self.rows))]

    def advance(self) -> None:
        for _, _, output, _ in self.rows.values():
            output.extend(self.rng.randrange(self.vocab) for _ in range(ADVANCE))

    def arguments(self) -> tuple[list, ...]:
        values = list(self.rows.values())
        return tuple([row[part] for row in values] for part in range(4))


def timed(device: torch.device, work) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - began) * 1e3, result


def equal(a: RowProcessors, b: RowProcessors) -> bool:
    names = ("presence", "frequency", "repetition", "bias", "min_tokens", "end_ids", "always_banned")
    names += ("output_counts", "prompt_seen", "generated", "recent")
    return all(
        (getattr(a, name) is None and getattr(b, name) is None) or torch.equal(getattr(a, name), getattr(b, name))
        for name in names
    )


def measure(rows: int, vocab: int, steps: int, device: torch.device) -> dict[str, float]:
    build_times, update_times, churn_times = [], [], []
    batch = Batch(rows, vocab, seed=0)
    for _ in range(steps):
        batch.advance()
        milliseconds, _ = timed(device, lambda: RowProcessors.build(*batch.arguments(), vocab, device))
        build_times.append(milliseconds)

    batch = Batch(rows, vocab, seed=0)
    firsts = []
    for _ in range(3):
        state = ProcessorState()
        milliseconds, _ = timed(
            device, lambda state=state: state.update(list(batch.rows), *batch.arguments(), vocab, device)
        )
        firsts.append(milliseconds)
    for _ in range(steps):
        batch.advance()
        milliseconds, kept = timed(device, lambda: state.update(list(batch.rows), *batch.arguments(), vocab, device))
        update_times.append(milliseconds)
    assert equal(kept, RowProcessors.build(*batch.arguments(), vocab, device))

    for _ in range(steps):
        batch.advance()
        batch.leave()
        batch.join()
        milliseconds, kept = timed(device, lambda: state.update(list(batch.rows), *batch.arguments(), vocab, device))
        churn_times.append(milliseconds)
    assert equal(kept, RowProcessors.build(*batch.arguments(), vocab, device))
    return {
        "build": statistics.median(build_times),
        "first": statistics.median(firsts),
        "update": statistics.median(update_times),
        "churn": statistics.median(churn_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (a shared machine varies less)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.threads} CPU thread(s), {args.steps} steps, milliseconds per step (median)")
    print(f"{'rows':>5} {'V':>7} {'build':>9} {'first':>9} {'update':>9} {'ratio':>7} {'churn':>9} {'ratio':>7}")
    for rows in args.rows:
        for vocab in args.vocab:
            result = measure(rows, vocab, args.steps, device)
            print(
                f"{rows:>5} {vocab:>7} {result['build']:>9.2f} {result['first']:>9.2f} {result['update']:>9.3f}"
                f" {result['build'] / result['update']:>6.0f}× {result['churn']:>9.2f}"
                f" {result['build'] / result['churn']:>6.1f}×"
            )


if __name__ == "__main__":
    main()
