"""Runners: a model plus its KV cache, behind one protocol (`Runner`)."""

from __future__ import annotations

import logging

from transformers import PreTrainedModel

from speculor.errors import SpeculorError
from speculor.runners.base import Runner
from speculor.runners.fast import DEFAULT_MAX_CACHE_LENGTH, FastRunner
from speculor.runners.hf import HFRunner, _context_length
from speculor.runners.llama import unsupported_reason

RUNNER_KINDS = ("auto", "fast", "hf")

logger = logging.getLogger(__name__)


def make_runner(
    model: PreTrainedModel, kind: str = "auto", *, max_cache_length: int | None = None, fixed_width: int | None = None
) -> Runner:
    """Pick the runner for a model: "hf" (generic), "fast" (static cache and CUDA graphs; Llama family only) or
    "auto" (fast where the architecture allows, else hf with a one-line notice). `max_cache_length` caps the fast
    runner's preallocated cache (default 4096 tokens). `fixed_width` runs every step of the fast runner at that many
    tokens, so verify and decode round alike (bit-identical greedy output in bf16); only the fast runner offers it."""
    if kind not in RUNNER_KINDS:
        raise SpeculorError(f"unknown runner {kind!r}: choose one of {', '.join(RUNNER_KINDS)}")
    if kind == "hf":
        if fixed_width is not None:
            raise SpeculorError("fixed_width needs the fast runner; the Hugging Face runner cannot pad its steps")
        return HFRunner(model)
    cap = max_cache_length or DEFAULT_MAX_CACHE_LENGTH
    if kind == "auto":
        reason = unsupported_reason(model, min(_context_length(model), cap))
        if reason is not None and fixed_width is not None:
            raise SpeculorError(f"fixed_width needs the fast runner, which cannot run this model: {reason}")
        if reason is not None:
            logger.warning("using the Hugging Face runner: the fast runner does not support this model (%s)", reason)
            return HFRunner(model)
    return FastRunner(model, max_cache_length=cap, fixed_width=fixed_width)


__all__ = ["RUNNER_KINDS", "FastRunner", "HFRunner", "Runner", "make_runner"]
