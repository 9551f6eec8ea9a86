"""Logits processing and sampling, shared by draft and target so that q and p are processed identically.

Everything here is a pure tensor function over rows: each row of a batch has its own temperature, top-k, top-p and
seed. Probabilities are computed in float32 (float64 when the logits are float64) because the acceptance ratio p/q
is only exact if both sides round the same way.

Randomness is counter-based: the uniform number behind a row's decision is a hash of (the row's seed, the position
in the sequence the decision is about, which decision it is, the vocabulary index). So a request draws exactly the
same numbers alone or in any batch, in any slot, without a generator object per row and without a host sync — and a
whole batch's noise is one vectorised computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speculor.errors import SpeculorError

# Which decision a uniform number is for: one stream each, so no two decisions about a position share randomness.
DRAFT_STREAM, ACCEPT_STREAM, TARGET_STREAM = 1, 2, 3

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX_1 = _signed(0xBF58476D1CE4E5B9)
_MIX_2 = _signed(0x94D049BB133111EB)
_POSITION_STEP = _signed(0xD6E8FEB86659FD93)
_STREAM_STEP = _signed(0xA0761D6478BD642F)


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a distribution. `temperature == 0` means greedy (argmax), where top-k/top-p do not matter."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or self.temperature < 0:
            raise SpeculorError(f"temperature must be a number ≥ 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise SpeculorError(f"top_k must be an integer ≥ 0 (0 or None disables it), got {self.top_k!r}")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise SpeculorError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class RowSampling:
    """The sampling parameters of a batch's rows as device tensors, (rows,) each: a temperature of 0 marks a greedy
    row, a top-k of 0 and a top-p of 1 disable those filters. `filtered` says whether any row uses a filter (the sort
    they need is skipped otherwise); `any_sampled` whether any row samples, `any_greedy` whether any row is greedy
    (so a batch of one kind never builds the other's distributions)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    filtered: bool
    any_sampled: bool
    any_greedy: bool

    @classmethod
    def build(cls, params: Sequence[SamplingParams], seeds: Sequence[int], device: torch.device) -> RowSampling:
        sampled = [p for p in params if not p.greedy]
        return cls(
            temperature=torch.tensor([float(p.temperature) for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k or 0 for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([float(p.top_p or 1.0) for p in params], dtype=torch.float32, device=device),
            seeds=torch.tensor([_signed(seed) for seed in seeds], dtype=torch.long, device=device),
            filtered=any(p.top_k or (p.top_p is not None and p.top_p < 1) for p in sampled),
            any_sampled=bool(sampled),
            any_greedy=len(sampled) < len(params),
        )

    def select(self, rows: torch.Tensor) -> RowSampling:
        """The parameters of a subset of rows (indices into this batch)."""
        return RowSampling(
            self.temperature[rows],
            self.top_k[rows],
            self.top_p[rows],
            self.seeds[rows],
            self.filtered,
            self.any_sampled,
            self.any_greedy,
        )


def _working_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(rows,) → broadcastable against `like` (rows, ..., V)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def row_probabilities(logits: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
    """Turn logits (rows, ..., V) into probabilities with each row's own parameters: temperature, then top-k, then
    top-p (as Hugging Face orders its warpers). Greedy rows get a one-hot distribution at the argmax."""
    logits = logits.to(_working_dtype(logits))
    if not sampling.any_sampled:
        return _one_hot_argmax(logits)
    greedy = _per_row(sampling.temperature == 0, logits)
    temperature = _per_row(sampling.temperature, logits).to(logits.dtype)
    logits = logits / torch.where(greedy, torch.ones_like(temperature), temperature)
    if sampling.filtered:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        vocab = logits.shape[-1]
        top_k = _per_row(sampling.top_k, logits)
        kth_index = torch.where(top_k > 0, top_k.clamp(max=vocab) - 1, vocab - 1).expand(*logits.shape[:-1], 1)
        kth_largest = sorted_logits.gather(-1, kth_index)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p; the most likely token always survives.
        top_p = _per_row(sampling.top_p, logits).to(logits.dtype)
        drop_sorted = (mass_before >= top_p) & (top_p < 1)
        drop_sorted |= sorted_logits == float("-inf")
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.where(greedy, _one_hot_argmax(logits), probs) if sampling.any_greedy else probs


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`row_probabilities` with one set of parameters for every row of `logits` (..., V)."""
    flat = logits.reshape(-1, logits.shape[-1])
    sampling = RowSampling.build([params] * flat.shape[0], [0] * flat.shape[0], logits.device)
    return row_probabilities(flat, sampling).view(logits.shape)


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int, width: int | None = None):
    """Uniform numbers in (0, 1), float64, from a hash of (seed, position, stream[, index]) — splitmix64's mixer.

    `seeds` is (rows,), `positions` (rows,) or (rows, k); the result has the shape of `positions`, plus a trailing
    `width` when given (one number per vocabulary index, for sampling). Integer overflow wraps, as 64-bit hashing
    intends; shifts are made logical by masking the sign extension."""
    key = seeds.view(-1, *([1] * (positions.dim() - 1))) * _GOLDEN
    key = key + positions * _POSITION_STEP + _signed(stream * _STREAM_STEP)
    if width is not None:
        indices = torch.arange(width, device=positions.device, dtype=torch.long)
        key = _mix(key)[..., None] + indices * _GOLDEN
    bits = _mix(key)
    # The top 53 bits, shifted logically, as a float in [0, 1); half a step up keeps it away from 0 and 1.
    mantissa = (bits >> 11) & ((1 << 53) - 1)
    return (mantissa.to(torch.float64) + 0.5) * 2.0**-53


def _mix(key: torch.Tensor) -> torch.Tensor:
    key = key ^ ((key >> 30) & ((1 << 34) - 1))
    key = key * _MIX_1
    key = key ^ ((key >> 27) & ((1 << 37) - 1))
    key = key * _MIX_2
    return key ^ ((key >> 31) & ((1 << 33) - 1))


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of `probs` (..., V) without a host sync: argmax of p / E with E = −log u exponential
    noise (the exponential race), which picks index i with probability p_i. `uniforms` has the shape of `probs`.
    Returns int64 of shape probs.shape[:-1]."""
    noise = -torch.log(uniforms).to(probs.dtype)
    return (probs / noise).argmax(-1)


def sample_rows(
    logits: torch.Tensor, sampling: RowSampling, positions: torch.Tensor, stream: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the next token of each row from logits (rows, V) at its sequence `positions` (rows,); return the tokens
    and the probabilities used (None when every row is greedy, where q is one-hot at the argmax)."""
    if not sampling.any_sampled:
        return logits.argmax(-1), None
    probs = row_probabilities(logits, sampling)
    uniforms = counter_uniform(sampling.seeds, positions, stream, probs.shape[-1])
    return sample(probs, uniforms), probs
