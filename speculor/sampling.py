"""Logits processing and sampling, shared by draft and target so that q and p are processed identically.

Everything here is a pure tensor function. Probabilities are computed in float32 (float64 when the logits are
float64) because the acceptance ratio p/q is only exact if both sides round the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculor.errors import SpeculorError


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a distribution. `temperature == 0` means greedy (argmax), where top-k/top-p do not matter."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise SpeculorError(f"temperature must be a number ≥ 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise SpeculorError(f"top_k must be an integer ≥ 0 (0 or None disables it), got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise SpeculorError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _working_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits (..., V) into probabilities (..., V): temperature, then top-k, then top-p (as Hugging Face orders
    its warpers). Greedy parameters give a one-hot distribution at the argmax."""
    logits = logits.to(_working_dtype(logits))
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p; the most likely token always survives.
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of `probs` (..., V) without a host sync: argmax of p / Exp(1) noise (the exponential
    race), which picks index i with probability p_i. Returns int64 of shape probs.shape[:-1]."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def sample_from_logits(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the next token(s) from logits; return (tokens, probabilities used or None when greedy)."""
    if params.greedy:
        return logits.argmax(-1), None
    probs = probabilities(logits, params)
    return sample(probs, generator), probs
