"""The speculative decoding loop: propose → verify → accept → resync → emit → stop, with its statistics.

This is the one place where γ (the number of drafted tokens per step) is used. Decoding the target alone is the
same loop with no proposer: every step then verifies zero drafts and emits one token.

Cache invariant between steps: the committed context is prompt + emitted tokens; the newest token is not yet in
any cache ("pending"), so every runner and proposer holds exactly `len(context) - 1` tokens or fewer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from speculor.adaptive import GammaPolicy
from speculor.proposers import Proposer
from speculor.runners.base import Runner
from speculor.sampling import SamplingParams, probabilities
from speculor.text import TextTracker
from speculor.verify import greedy_accept, stochastic_accept


@dataclass
class GenerationStats:
    """Counters and timings of one generate call. TAR = accepted / drafted; mean accepted length = tokens emitted
    per target forward, the bonus token included."""

    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    prefill_seconds: float = 0.0
    time_to_first_token: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def other_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.draft_seconds - self.verify_seconds)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            tokens_per_second=self.tokens_per_second,
            other_seconds=self.other_seconds,
        )
        return data

    def record_step(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.target_forwards += 1
        for counts in (self.drafted_by_position, self.accepted_by_position):
            counts.extend([0] * (drafted - len(counts)))
        for position in range(drafted):
            self.drafted_by_position[position] += 1
        for position in range(accepted):
            self.accepted_by_position[position] += 1


@dataclass
class GenerationResult:
    """`token_ids` holds the generated ids only; `text` is None when the model has no tokenizer."""

    text: str | None
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str = "length"


@dataclass
class Delta:
    """One streamed piece: the new token ids and the text now safe to show."""

    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class DecodeRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    gamma: GammaPolicy
    eos_ids: frozenset[int]
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    max_gamma: int | None = None  # a cap from the target runner (fixed-width steps), applied to adaptive policies


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PhaseClock:
    """Times the draft and verify phases without forcing a device sync inside the step: CUDA events on a GPU (read
    after the step's one host read has completed them), the host clock elsewhere. A step makes three marks
    (`DRAFT`, `VERIFY`, `DONE`); on a GPU the same three events are recorded again each step, since creating
    events costs driver calls every step."""

    DRAFT, VERIFY, DONE = range(3)

    def __init__(self, device: torch.device) -> None:
        self.on_gpu = device.type == "cuda"
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if self.on_gpu else []
        self._times = [0.0, 0.0, 0.0]

    def mark(self, phase: int) -> None:
        if self.on_gpu:
            self._events[phase].record()
        else:
            self._times[phase] = time.perf_counter()

    def seconds(self, start: int, end: int) -> float:
        if self.on_gpu:
            return self._events[start].elapsed_time(self._events[end]) / 1000
        return self._times[end] - self._times[start]


class Decoding:
    """One generation in progress: iterate it for `Delta`s; `result` is complete once iteration ends."""

    def __init__(
        self, target: Runner, proposer: Proposer | None, vocab_size: int, tracker: TextTracker, request: DecodeRequest
    ) -> None:
        self.target = target
        self.proposer = proposer
        self.vocab_size = vocab_size
        self.tracker = tracker
        self.request = request
        self.stats = GenerationStats()
        self.generated: list[int] = []
        self.finish_reason = "length"
        self.result: GenerationResult | None = None
        self.clock = _PhaseClock(target.device)
        # The last step's emitted token as it already sits on the device, with its index in the context: the next
        # step feeds it to the target without another host-to-device copy.
        self._last_token: tuple[torch.Tensor, int] | None = None

    def __iter__(self) -> Iterator[Delta]:
        request, stats = self.request, self.stats
        device = self.target.device
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=device).manual_seed(request.seed)
        started = time.perf_counter()
        context = list(request.prompt_ids)
        self.target.prefill(torch.tensor(context[:-1], dtype=torch.long, device=device))
        if self.proposer is not None:
            self.proposer.start(context)
        _synchronize(device)
        stats.prefill_seconds = time.perf_counter() - started
        try:
            while True:
                remaining = request.max_new_tokens - len(self.generated)
                emitted = self._step(context, remaining, generator)
                delta_ids, text = self._accept_tokens(emitted, remaining)
                context.extend(delta_ids)
                if not stats.time_to_first_token:
                    stats.time_to_first_token = time.perf_counter() - started
                done = self.finish_reason != "length" or len(self.generated) >= request.max_new_tokens
                if done:
                    text += self.tracker.finish(self.generated)
                stats.new_tokens = len(self.generated)
                stats.wall_seconds = time.perf_counter() - started
                yield Delta(delta_ids, text)
                if done:
                    break
                committed = len(context) - 1
                self.target.truncate(committed)
                if self.proposer is not None:
                    self.proposer.rollback(committed)
        finally:
            stats.new_tokens = len(self.generated)
            stats.wall_seconds = time.perf_counter() - started
            self.result = GenerationResult(self.tracker.text, list(self.generated), stats, self.finish_reason)

    def _step(self, context: list[int], remaining: int, generator: torch.Generator | None) -> list[int]:
        """One target forward: draft (unless decoding alone), verify, accept. Returns the tokens this step yields."""
        request, stats, clock = self.request, self.stats, self.clock
        device = self.target.device
        drafts = None
        draft_probs = None
        clock.mark(clock.DRAFT)
        if self.proposer is not None and remaining > 1:
            # Never draft past max_new_tokens: the step can emit γ + 1 tokens.
            gamma = min(request.gamma.next_gamma(), remaining - 1, request.max_gamma or remaining)
            proposal = self.proposer.propose(
                context, gamma, request.params, generator, request.gamma.confidence_threshold
            )
            drafts, draft_probs = proposal.tokens, proposal.probs
            stats.draft_forwards += proposal.forwards
        clock.mark(clock.VERIFY)
        pending = self._pending_tokens(context)
        if drafts is None:
            drafts = torch.empty(0, dtype=torch.long, device=device)
            logits = self.target.forward(pending)[-1:, : self.vocab_size]
        else:
            logits = self.target.forward(torch.cat([pending, drafts]))[-(drafts.numel() + 1) :, : self.vocab_size]
        if request.params.greedy:
            accepted, next_token = greedy_accept(drafts, logits)
        else:
            target_probs = probabilities(logits, request.params)
            accepted, next_token = stochastic_accept(drafts, draft_probs, target_probs, generator)
        clock.mark(clock.DONE)
        # The single host read of the step; on a GPU it also completes the timing events above.
        values = torch.cat([drafts, accepted.view(1), next_token.view(1)]).tolist()
        stats.draft_seconds += clock.seconds(clock.DRAFT, clock.VERIFY)
        stats.verify_seconds += clock.seconds(clock.VERIFY, clock.DONE)
        drafted, count = len(values) - 2, values[-2]
        self._last_token = (next_token.view(1), len(context) + count)
        stats.record_step(drafted, count)
        if self.proposer is not None and drafted:
            request.gamma.observe(drafted, count)
        return [*values[:count], values[-1]]

    def _pending_tokens(self, context: list[int]) -> torch.Tensor:
        """The committed tokens the target has not seen yet: after a step, just the token it emitted last, which is
        still on the device; otherwise (the first step) copied from the context."""
        start = self.target.cache_length
        # The index differs when the emitted tokens were cut short (a stop or max_new_tokens): then copy.
        if self._last_token is not None and self._last_token[1] == start == len(context) - 1:
            return self._last_token[0]
        return torch.tensor(context[start:], dtype=torch.long, device=self.target.device)

    def _accept_tokens(self, emitted: list[int], remaining: int) -> tuple[list[int], str]:
        """Append emitted tokens one by one, stopping at EOS (kept, as Hugging Face does), at a stop string (the
        token that completes it is kept, its text is not) or at max_new_tokens. Returns the ids and new text."""
        taken: list[int] = []
        text = ""
        check_each = bool(self.tracker.stop)
        for token in emitted[:remaining]:
            taken.append(token)
            self.generated.append(token)
            if check_each:
                text += self.tracker.update(self.generated)
                if self.tracker.stopped:
                    self.finish_reason = "stop"
                    break
            if not self.request.ignore_eos and token in self.request.eos_ids:
                self.finish_reason = "eos"
                break
        if not check_each:
            text = self.tracker.update(self.generated)
        return taken, text
