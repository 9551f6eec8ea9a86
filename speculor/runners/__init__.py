"""Runners: a model plus its KV cache, behind one protocol (`Runner`)."""

from __future__ import annotations

import logging

from transformers import PreTrainedModel

from speculor.errors import SpeculorError
from speculor.runners.base import Runner
from speculor.runners.fast import DEFAULT_MAX_CACHE_LENGTH, KERNEL_CHOICES, FastRunner
from speculor.runners.hf import HFRunner, _context_length
from speculor.runners.llama import unsupported_reason

RUNNER_KINDS = ("auto", "fast", "hf")

logger = logging.getLogger(__name__)


def make_runner(
    model: PreTrainedModel,
    kind: str = "auto",
    *,
    max_cache_length: int | None = None,
    fixed_width: int | None = None,
    kernels: str = "auto",
    slots: int = 1,
) -> Runner:
    """Pick the runner for a model: "hf" (generic), "fast" (static cache and CUDA graphs; Llama family only) or
    "auto" (fast where the architecture allows, else hf with a one-line notice). `max_cache_length` caps the fast
    runner's preallocated cache (default 4096 tokens). `fixed_width` runs every step of the fast runner at that many
    tokens, so verify and decode round alike (bit-identical greedy output in bf16); only the fast runner offers it.
    `kernels` ("auto", "triton", "torch") picks the fast runner's per-layer kernels (see `FastRunner`). `slots` is
    how many sequences the runner holds at once (the batch size)."""
    if kind not in RUNNER_KINDS:
        raise SpeculorError(f"unknown runner {kind!r}: choose one of {', '.join(RUNNER_KINDS)}")
    if kernels not in KERNEL_CHOICES:
        raise SpeculorError(f"unknown kernels {kernels!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    # Options that only the fast runner honours: asking for them where it cannot run is an error, not a fallback.
    needs_fast = "fixed_width" if fixed_width is not None else "kernels='triton'" if kernels == "triton" else None
    if kind == "hf":
        if needs_fast:
            raise SpeculorError(f"{needs_fast} needs the fast runner; runner='hf' runs transformers' own modules")
        return HFRunner(model, slots=slots)
    cap = max_cache_length or DEFAULT_MAX_CACHE_LENGTH
    if kind == "auto":
        reason = unsupported_reason(model, min(_context_length(model), cap))
        if reason is not None and needs_fast:
            raise SpeculorError(f"{needs_fast} needs the fast runner, which cannot run this model: {reason}")
        if reason is not None:
            _notice_fallback(model, reason)
            return HFRunner(model, slots=slots)
    return FastRunner(model, max_cache_length=cap, fixed_width=fixed_width, kernels=kernels, slots=slots)


_noticed: set[str] = set()


def _notice_fallback(model: PreTrainedModel, reason: str) -> None:
    """One line per kind of model and reason, however many runners (a target and a draft of one family) fall back."""
    key = f"{type(model).__name__}: {reason}"
    if key in _noticed:
        return
    _noticed.add(key)
    logger.warning(
        "using the Hugging Face runner for %s: the fast runner does not support it (%s); it runs a batch's rows one "
        "after another",
        type(model).__name__,
        reason,
    )


__all__ = ["RUNNER_KINDS", "FastRunner", "HFRunner", "Runner", "make_runner"]
