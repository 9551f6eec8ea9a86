"""The trained model family shipped inside the package: one target and several drafts sharing one tokenizer.

They were trained from scratch with `speculor train` on Python source (see each directory's README.md for the exact
command, corpus, tokens seen and held-out loss), small enough to ship (under 58 MiB of weights in all, the EAGLE-3
head included) and to run on a laptop CPU, so that tests, benchmarks, the demo and users have a real target/draft
pair without a download.

The drafts differ in the one thing that decides speculative decoding on small models, depth against width at a
similar size: `draft-4x128` (deep and narrow) and `draft-1x192` (shallow and wide) have about 1.8M and 2.0M
parameters and the same 40 s of training. `draft-3x128` is one layer shallower; `draft-4x128-long` is the deep
shape distilled for longer (90 s), and is the best draft. Greedy acceptance rates with the target on the 164
HumanEval prompts (γ = 4, 128 tokens): draft-4x128-long 0.734, draft-4x128 0.658, draft-3x128 0.485, draft-1x192
0.301 (benchmarks/RESULTS.md, section "Shipped family").

`draft-4x128-parallel` is draft-4x128-long made into a parallel draft with `speculor train-parallel` (one forward
proposes up to 6 tokens; its model card has the numbers). Its vocabulary is one token wider (the mask token), so it
is listed apart from the ordinary drafts, in `parallel_drafts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from speculor.errors import SpeculorError

MODELS_DIR = Path(__file__).resolve().parent
TARGET = "target"
DRAFTS = ("draft-4x128-long", "draft-4x128", "draft-3x128", "draft-1x192")
BEST_DRAFT = "draft-4x128-long"
PARALLEL_DRAFTS = ("draft-4x128-parallel",)


@dataclass(frozen=True)
class ShippedFamily:
    """Directories of the shipped models, ready for `SpeculativeDecoder(family.target, family.best_draft)` or
    `from_pretrained`. `drafts` maps each draft's name to its directory, best first; `parallel_drafts` the parallel
    drafts (`speculor train-parallel`) the same way."""

    target: Path
    drafts: dict[str, Path]
    best_draft_name: str
    parallel_drafts: dict[str, Path] = field(default_factory=dict)

    @property
    def best_draft(self) -> Path:
        return self.drafts[self.best_draft_name]


def shipped() -> ShippedFamily:
    """The shipped target and drafts. Raises `SpeculorError` if an install left the weights out."""
    target = MODELS_DIR / TARGET
    drafts = {name: MODELS_DIR / name for name in DRAFTS}
    parallel_drafts = {name: MODELS_DIR / name for name in PARALLEL_DRAFTS}
    every = (target, *drafts.values(), *parallel_drafts.values())
    missing = [path.name for path in every if not (path / "config.json").is_file()]
    if missing:
        raise SpeculorError(
            f"the shipped models {', '.join(missing)} are missing from {MODELS_DIR}; this installation of speculor "
            "was built without its package data (reinstall it, or train a family with `speculor train`)"
        )
    return ShippedFamily(target=target, drafts=drafts, best_draft_name=BEST_DRAFT, parallel_drafts=parallel_drafts)


__all__ = ["BEST_DRAFT", "DRAFTS", "MODELS_DIR", "PARALLEL_DRAFTS", "TARGET", "ShippedFamily", "shipped"]
