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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from speculor.errors import SpeculorError
from speculor.processors import RowProcessors

if TYPE_CHECKING:
    from speculor.grammar import CompiledStructure

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


# Temperatures below this are greedy. At 1e-5 a token whose logit trails the best by 0.001 — about the rounding of
# float32 logits — is already e^100 times less likely, so sampling could differ from argmax only at exact ties; the
# greedy path is exact and cheaper, and deciding here, once, keeps draft and target agreeing on which rows are greedy.
GREEDY_TEMPERATURE_BELOW = 1e-5
# Probabilities are computed in float32: a larger temperature would round to infinity there.
MAX_TEMPERATURE = torch.finfo(torch.float32).max
# No vocabulary has 2^31 tokens, so a larger top-k filters nothing: it is stored as "off" and never reaches int64.
MAX_TOP_K = (1 << 31) - 1


# OpenAI's ranges for the presence and frequency penalties, and for a logit bias.
MAX_PRESENCE_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How logits become a distribution. `temperature == 0` means greedy (argmax), where top-k/top-p/min-p do not
    matter.

    The processors (`speculor.processors`) come first, on the logits, and greedy takes the argmax of what they
    leave: `presence_penalty` and `frequency_penalty` (OpenAI's, over generated tokens, in [-2, 2]),
    `repetition_penalty` (> 0, 1 is off; over prompt and output), `logit_bias` ((token id, bias) pairs or a mapping,
    each bias in [-100, 100]), `min_tokens` (the end ids and `stop_token_ids` are banned until that many tokens are
    generated), `bad_words` (token-id sequences never generated: the last token of each is banned wherever the
    tokens before it end the context), `structured` (a grammar the output follows, `speculor.grammar`: compile it
    with `SpeculativeDecoder.request(structured=...)` or a `StructureCompiler`). `stop_token_ids` also end the
    generation (reason "stop"), `ignore_eos` or not. `min_p` (in [0, 1]) drops tokens less likely than min_p times
    the most likely one, after top-p, as Hugging Face orders its warpers.

    Every value accepted here is safe downstream: construction normalises a temperature below
    `GREEDY_TEMPERATURE_BELOW` to 0 (greedy) and a top-k above `MAX_TOP_K` to None (off), stores the list-valued
    options as tuples (so the parameters stay hashable), and refuses what no tensor could hold (infinite or NaN
    values, booleans). Token ids are checked against the vocabulary by `SpeculativeDecoder.request`, which knows
    it."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()
    structured: CompiledStructure | None = None

    def __post_init__(self) -> None:
        self._check_processor_options()
        temperature, top_k, top_p = self.temperature, self.top_k, self.top_p
        if not _is_number(temperature) or not 0 <= temperature <= MAX_TEMPERATURE:
            raise SpeculorError(
                f"temperature must be a number ≥ 0 and finite (at most {MAX_TEMPERATURE:.3g}), got {temperature!r}"
            )
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
            raise SpeculorError(f"top_k must be an integer ≥ 0 (0 or None disables it), got {top_k!r}")
        if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
            raise SpeculorError(f"top_p must be in (0, 1], got {top_p!r}")
        # A frozen dataclass sets its normalised fields through object.__setattr__.
        if temperature < GREEDY_TEMPERATURE_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if top_k is not None and top_k > MAX_TOP_K:
            object.__setattr__(self, "top_k", None)

    def _check_processor_options(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PRESENCE_PENALTY <= value <= MAX_PRESENCE_PENALTY:
                raise SpeculorError(f"{name} must be a number in [-2, 2], got {value!r}")
        repetition = self.repetition_penalty
        if not _is_number(repetition) or not 0 < repetition < math.inf:
            raise SpeculorError(f"repetition_penalty must be a finite number > 0 (1 is off), got {repetition!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise SpeculorError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if not _is_count(self.min_tokens):
            raise SpeculorError(f"min_tokens must be an integer ≥ 0, got {self.min_tokens!r}")
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        try:
            bias = tuple(sorted((token, value) for token, value in pairs))
        except (TypeError, ValueError):
            raise SpeculorError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}") from None
        for token, value in bias:
            if not _is_count(token) or not _is_number(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise SpeculorError(
                    f"logit_bias maps token ids (≥ 0) to numbers in [-100, 100], got {token!r}: {value!r}"
                )
        stop_ids = tuple(self.stop_token_ids)
        if not all(_is_count(token) for token in stop_ids):
            raise SpeculorError(f"stop_token_ids must be token ids (integers ≥ 0), got {self.stop_token_ids!r}")
        words = tuple(tuple(word) for word in self.bad_words)
        if not all(word and all(_is_count(token) for token in word) for word in words):
            raise SpeculorError(f"bad_words must be non-empty sequences of token ids, got {self.bad_words!r}")
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "stop_token_ids", stop_ids)
        object.__setattr__(self, "bad_words", words)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processed(self) -> bool:
        """Whether any logits processor is on (`speculor.processors`): penalties, bias, min_tokens, bad words, a
        grammar."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1
            or self.logit_bias
            or self.min_tokens
            or self.bad_words
            or self.structured is not None
        )

    def token_ids(self) -> set[int]:
        """Every token id the options name (for the caller to check against its vocabulary)."""
        named = {token for token, _ in self.logit_bias} | set(self.stop_token_ids)
        return named | {token for word in self.bad_words for token in word}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
    # Rows whose output must be exactly the target alone's sample for their seed (`reproducible`, (rows,) bool):
    # their drafts are drawn with the target's noise and verified by coupling (`speculor.verify.match_accept`).
    reproducible: torch.Tensor | None = None
    any_reproducible: bool = False
    # Whether every row is reproducible or greedy, so coupling alone verifies the batch (known on the host: no sync).
    only_coupled: bool = False
    # Each row's min-p ((rows,), 0 is off), None when no sampled row uses it.
    min_p: torch.Tensor | None = None
    # The rows' logits processors with their state after the committed tokens, None when no row has any: set per
    # step by the engine (`with_processors`), since their state changes with every token.
    processors: RowProcessors | None = None

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        device: torch.device,
        reproducible: Sequence[bool] | None = None,
    ) -> RowSampling:
        sampled = [p for p in params if not p.greedy]
        flags = reproducible if reproducible is not None else [False] * len(params)
        coupled = [bool(flag) and not p.greedy for flag, p in zip(flags, params, strict=True)]
        return cls(
            temperature=torch.tensor([float(p.temperature) for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k or 0 for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([float(p.top_p or 1.0) for p in params], dtype=torch.float32, device=device),
            seeds=torch.tensor([_signed(seed) for seed in seeds], dtype=torch.long, device=device),
            filtered=any(p.top_k or (p.top_p is not None and p.top_p < 1) for p in sampled),
            any_sampled=bool(sampled),
            any_greedy=len(sampled) < len(params),
            reproducible=torch.tensor(coupled, dtype=torch.bool, device=device) if any(coupled) else None,
            any_reproducible=any(coupled),
            only_coupled=any(coupled) and all(flag or p.greedy for flag, p in zip(coupled, params, strict=True)),
            min_p=(
                torch.tensor([float(p.min_p) for p in params], dtype=torch.float32, device=device)
                if any(p.min_p for p in sampled)
                else None
            ),
        )

    def with_processors(self, processors: RowProcessors | None) -> RowSampling:
        return replace(self, processors=processors)

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
            self.reproducible[rows] if self.reproducible is not None else None,
            self.any_reproducible,
            self.only_coupled,
            self.min_p[rows] if self.min_p is not None else None,
            self.processors.select(rows) if self.processors is not None else None,
        )


def _working_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(rows,) → broadcastable against `like` (rows, ..., V)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def row_probabilities(logits: torch.Tensor, sampling: RowSampling) -> torch.Tensor:
    """Turn logits (rows, ..., V) into probabilities with each row's own parameters: temperature, then top-k, then
    top-p (as Hugging Face orders its warpers). Greedy rows get a one-hot distribution at the argmax.

    No row comes out NaN: each row is shifted so its largest logit is 0 before the temperature divides it, so even a
    temperature near float32's smallest only sends the others to -inf (probability 0) instead of overflowing to +inf;
    the most likely token survives any top-p; and, as a last resort for logits that are not finite themselves (NaN
    or +inf from the model), a row whose softmax is NaN becomes one-hot at its argmax, as a greedy row is."""
    logits = logits.to(_working_dtype(logits))
    if not sampling.any_sampled:
        return _one_hot_argmax(logits)
    greedy = _per_row(sampling.temperature == 0, logits)
    temperature = _per_row(sampling.temperature, logits).to(logits.dtype)
    scaled = (logits - logits.amax(-1, keepdim=True)) / torch.where(greedy, torch.ones_like(temperature), temperature)
    if sampling.filtered:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        vocab = scaled.shape[-1]
        top_k = _per_row(sampling.top_k, scaled)
        kth_index = torch.where(top_k > 0, top_k.clamp(max=vocab) - 1, vocab - 1).expand(*scaled.shape[:-1], 1)
        kth_largest = sorted_logits.gather(-1, kth_index)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p. The first token is kept explicitly: its mass before is
        # 0, and a top_p that rounds to 0 in float32 (1e-50) would otherwise drop it and leave nothing.
        top_p = _per_row(sampling.top_p, scaled).to(scaled.dtype)
        drop_sorted = (mass_before >= top_p) & (top_p < 1)
        drop_sorted |= sorted_logits == float("-inf")
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = scaled.softmax(-1)
    if sampling.min_p is not None:
        # Min-p after top-k and top-p, on the distribution they left (Hugging Face's order): the ratio to the most
        # likely token, which every filter keeps, is what min-p compares.
        threshold = _per_row(sampling.min_p, probs).to(probs.dtype) * probs.amax(-1, keepdim=True)
        probs = scaled.masked_fill(probs < threshold, float("-inf")).softmax(-1)
    one_hot = probs.sum(-1, keepdim=True).isnan()
    if sampling.any_greedy:
        one_hot |= greedy
    # One-hot rows in place: no (rows, ..., V) one-hot tensor is built for a batch that needs none.
    best = logits.argmax(-1, keepdim=True)
    probs.masked_fill_(one_hot, 0.0)
    return probs.scatter_(-1, best, torch.where(one_hot, 1.0, probs.gather(-1, best)))


def _one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`row_probabilities` with one set of parameters for every row of `logits` (..., V)."""
    flat = logits.reshape(-1, logits.shape[-1])
    sampling = RowSampling.build([params] * flat.shape[0], [0] * flat.shape[0], logits.device)
    return row_probabilities(flat, sampling).view(logits.shape)


def counter_uniform(
    seeds: torch.Tensor, positions: torch.Tensor, stream: int | torch.Tensor, width: int | None = None
) -> torch.Tensor:
    """Uniform numbers in (0, 1), float64, from a hash of (seed, position, stream[, index]) — splitmix64's mixer.

    `seeds` is (rows,), `positions` (rows,) or (rows, k), `stream` one for all rows or (rows,); the result has the
    shape of `positions`, plus a trailing `width` when given (one number per vocabulary index, for sampling). Integer
    overflow wraps, as 64-bit hashing intends; shifts are made logical by masking the sign extension."""
    per_row = [1] * (positions.dim() - 1)
    key = seeds.view(-1, *per_row) * _GOLDEN + positions * _POSITION_STEP
    if isinstance(stream, torch.Tensor):
        key = key + stream.view(-1, *per_row) * _STREAM_STEP
    else:
        key = key + _signed(stream * _STREAM_STEP)
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
    logits: torch.Tensor,
    sampling: RowSampling,
    positions: torch.Tensor,
    stream: int,
    drafted: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick the next token of each row from logits (rows, V) at its sequence `positions` (rows,); return the tokens
    and the probabilities used (None when every row is greedy, where q is one-hot at the argmax). `drafted` are the
    tokens (rows,) each drafted so far in this step, in order: the logits processors see the state after them."""
    if sampling.processors is not None:
        rows = logits.shape[0]
        before = torch.stack(list(drafted), dim=1) if drafted else logits.new_zeros(rows, 0, dtype=torch.long)
        logits = sampling.processors.apply(logits[:, None], before, offset=len(drafted))[:, 0]
    if not sampling.any_sampled:
        return logits.argmax(-1), None
    probs = row_probabilities(logits, sampling)
    uniforms = counter_uniform(sampling.seeds, positions, row_streams(sampling, stream), probs.shape[-1])
    return sample(probs, uniforms), probs


def row_streams(sampling: RowSampling, stream: int) -> int | torch.Tensor:
    """The noise stream each row draws from for a decision of kind `stream`: a reproducible row drafts with the
    target's own noise (`TARGET_STREAM`), so its draft proposes the token the target will pick whenever both models
    agree on it (drafter-invariant verification, Daliri, Musco and Suresh, arXiv 2408.07978)."""
    if stream != DRAFT_STREAM or sampling.reproducible is None:
        return stream
    return torch.where(sampling.reproducible, TARGET_STREAM, DRAFT_STREAM)
