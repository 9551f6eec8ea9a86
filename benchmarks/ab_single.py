"""Batch 1, one sequence at a time, in whatever speculor tree is on PYTHONPATH: tokens/s of the shipped target alone
and with its best draft at γ = 4, over 8 HumanEval prompts, 64 forced tokens each, on THREADS CPU threads (default 2,
what speculor picks on an idle two-core machine). One JSON line.

Alternate it between two trees to compare them side by side (the same machine, the same minutes):

    git worktree add /tmp/old-tree <old commit>
    for round in 1 2 3; do for tree in /tmp/old-tree .; do
        PYTHONPATH=$tree python benchmarks/ab_single.py $tree 2; done; done
"""

from __future__ import annotations

import json
import sys
import time

import torch

from speculor.api import SpeculativeDecoder
from speculor.prompts import load_prompts


def main(root: str, threads: int) -> None:
    torch.set_num_threads(threads)
    models = f"{root}/speculor/models"
    decoder = SpeculativeDecoder(f"{models}/target", f"{models}/draft-4x128-long", device="cpu")
    torch.set_num_threads(threads)
    prompts = load_prompts("humaneval")[:8]
    decoder.generate(prompts[0], max_new_tokens=16, gamma=4)
    rates = {}
    for name, options in (("alone", {"speculative": False}), ("gamma4", {"gamma": 4})):
        tokens, wall = 0, 0.0
        for prompt in prompts:
            began = time.perf_counter()
            result = decoder.generate(prompt, max_new_tokens=64, ignore_eos=True, **options)
            wall += time.perf_counter() - began
            tokens += len(result.token_ids)
        rates[name] = tokens / wall
    print(json.dumps({"tree": root, "threads": torch.get_num_threads(), **rates}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
