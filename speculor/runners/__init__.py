"""Runners: a model plus its KV cache, behind one protocol (`Runner`)."""

from __future__ import annotations

from transformers import PreTrainedModel

from speculor.errors import SpeculorError
from speculor.runners.base import Runner
from speculor.runners.hf import HFRunner

RUNNER_KINDS = ("auto", "fast", "hf")


def make_runner(model: PreTrainedModel, kind: str = "auto") -> Runner:
    """Pick the runner for a model: "hf" (generic), "fast" (static cache; Llama family only) or "auto"."""
    if kind not in RUNNER_KINDS:
        raise SpeculorError(f"unknown runner {kind!r}: choose one of {', '.join(RUNNER_KINDS)}")
    return HFRunner(model)


__all__ = ["RUNNER_KINDS", "HFRunner", "Runner", "make_runner"]
