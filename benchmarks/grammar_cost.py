"""What a grammar costs per speculative step: the host's grammar work (the matchers' masks after each drafted prefix,
the commit after each step) against the whole step, for a batch whose every row follows a JSON schema.

    python benchmarks/grammar_cost.py                                     # shipped pair, CPU, batch 16, γ 1 3 5
    python benchmarks/grammar_cost.py --target T --draft D --device cuda --dtype bfloat16 --batch 16 --json cost.json

The schemas are the generated ones of tests/test_grammar.py (nested objects, arrays, enums, patterns, bounded
values), one per row; greedy and sampled (temperature 1) runs at each γ. The grammar's work is timed by wrapping
`RowGrammars.mask` and `GrammarRow.commit`. On a GPU that time includes waiting for the drafts the masks need (one
host read per drafted position and one for the verify, which a batch without a grammar does not make), and rows
with a grammar never take the queued look-ahead, so the whole cost there is this share plus the look-ahead's gain.
A batch without the schemas is no baseline for the step time: its rows run to the token limit while a grammar
row ends with its object, so the batches differ in size along the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# The tests' generated schemas, so the benchmark and the validity test cover the same ones.
from test_grammar import SCHEMAS

from speculor import SpeculativeDecoder, StructuredOutput, models
from speculor.grammar import GrammarRow, RowGrammars

PROMPT = "def main():\n    config = "


class GrammarClock:
    """Seconds spent in the grammar's host work, by wrapping its two entry points."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for owner, name in ((RowGrammars, "mask"), (GrammarRow, "commit")):
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began

        return timed


def run(decoder: SpeculativeDecoder, batch: int, gamma: int, temperature: float, tokens: int) -> dict:
    requests = [
        decoder.request(
            PROMPT,
            max_new_tokens=tokens,
            gamma=gamma,
            temperature=temperature,
            seed=index,
            structured=StructuredOutput.json_schema(SCHEMAS[index % len(SCHEMAS)], strict=True),
        )
        for index in range(batch)
    ]
    engine = decoder.new_engine()
    for request in requests:
        engine.add(request)
    steps, began = 0, time.perf_counter()
    while engine.running:
        engine.step()
        steps += 1
    if decoder.device.type == "cuda":
        torch.cuda.synchronize()
    return {"steps": steps, "seconds": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gammas", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--tokens", type=int, default=96, help="new tokens at most per row")
    parser.add_argument("--json", type=Path, help="write the rows here")
    options = parser.parse_args()
    family = models.shipped()
    decoder = SpeculativeDecoder(
        options.target or family.target,
        options.draft or family.best_draft,
        device=options.device,
        dtype=getattr(torch, options.dtype),
        max_batch_size=options.batch,
    )
    clock = GrammarClock()
    run(decoder, 2, options.gammas[0], 0.0, 8)  # warm-up: compile the schemas, fill the caches
    rows = []
    for gamma in options.gammas:
        for temperature in (0.0, 1.0):
            clock.seconds = 0.0
            result = run(decoder, options.batch, gamma, temperature, options.tokens)
            row = {
                "batch": options.batch,
                "gamma": gamma,
                "temperature": temperature,
                "steps": result["steps"],
                "step_ms": 1e3 * result["seconds"] / result["steps"],
                "grammar_ms_per_step": 1e3 * clock.seconds / result["steps"],
                "grammar_share": clock.seconds / result["seconds"],
            }
            rows.append(row)
            print(
                f"B={options.batch} γ={gamma} T={temperature:g}: {row['steps']} steps, step {row['step_ms']:.2f} ms, "
                f"grammar {row['grammar_ms_per_step']:.2f} ms/step = {100 * row['grammar_share']:.1f}%"
            )
    if options.json is not None:
        options.json.write_text(json.dumps({"device": options.device, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
