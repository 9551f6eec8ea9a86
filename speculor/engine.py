"""The speculative decoding loop, for a batch of rows: propose → verify → accept → resync → emit → stop.

This is the one place where γ (the number of drafted tokens per step) is used. Decoding the target alone is the
same loop with no proposer: every step then verifies zero drafts and emits one token per row.

`BatchEngine` is request-level: `add` a request (it takes a free slot of the runners), call `step` to advance every
running row by one target forward, `abort` a row. A step drafts for all rows at once (each row drafts its own γ;
shorter proposals are padded), runs one target forward over all rows, accepts per row (vectorised, one host read per
step), then emits per row, handling EOS, stop strings and max_new_tokens. New rows are prefilled inside `step` in
chunks of at most `prefill_chunk` tokens per step, so a long prompt delays the running rows by one chunk's prefill at
a time, never its whole prefill. A single generation (`Decoding`) is a batch of one on the same loop.

Cache invariant between steps: a row's committed context is prompt + emitted tokens; the newest token is not yet in
any cache ("pending"), so the target holds exactly `len(context) - 1` tokens of the row, the draft that many or fewer.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from speculor.adaptive import FixedGamma, GammaPolicy, LoadAwareGamma
from speculor.errors import SpeculorError
from speculor.grammar import GrammarRow
from speculor.processors import ProcessorState, RowProcessors
from speculor.proposers import Proposer
from speculor.runners.base import Runner
from speculor.runners.fast import host_to_device
from speculor.sampling import (
    ACCEPT_STREAM,
    TARGET_STREAM,
    RowSampling,
    SamplingParams,
    counter_uniform,
    row_probabilities,
    sample,
)
from speculor.text import TextTracker
from speculor.verify import greedy_accept, match_accept, stochastic_accept

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class GenerationStats:
    """Counters and timings of one generation.

    `drafted` counts the drafted tokens the target verified, `accepted` those it accepted; TAR = accepted / drafted;
    mean accepted length = tokens emitted per target forward, the bonus token included. A step cut short by EOS, a
    stop string or max_new_tokens counts only the drafts up to the cut, so the counters always add up:
    `new_tokens == accepted + tokens chosen by the target`, with at most one target-chosen token per forward.
    `gamma_steps` maps each γ this row drafted to how many steps drafted it (0 = a step without speculation)."""

    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    gamma_steps: dict[int, int] = field(default_factory=dict)
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

    def record_step(self, gamma: int, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.target_forwards += 1
        self.gamma_steps[gamma] = self.gamma_steps.get(gamma, 0) + 1
        for counts in (self.drafted_by_position, self.accepted_by_position):
            counts.extend([0] * (drafted - len(counts)))
        for position in range(drafted):
            self.drafted_by_position[position] += 1
        for position in range(accepted):
            self.accepted_by_position[position] += 1


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-probability of an emitted token (from its raw logits, before temperature, top-k or top-p)
    and the `top` most likely tokens at that position with theirs, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationResult:
    """`token_ids` holds the generated ids only; `text` is None when the model has no tokenizer. `finish_reason` is
    "eos", "stop", "length", "abort" or "error" (then `error` says what failed; the tokens before it stand).
    `logprobs` holds one entry per generated token when the request asked for them."""

    text: str | None
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str = "length"
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass
class Delta:
    """One streamed piece: the new token ids, the text now safe to show, and the tokens' log-probabilities when the
    request asked for them."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class DecodeRequest:
    """One generation, checked. `gamma` None lets the engine pick γ for the whole batch each step (`LoadAwareGamma`);
    a `GammaPolicy` gives this row its own. `seed` None draws a fresh one. `logprobs` asks for the target's
    log-probability of each token plus that many alternatives (None: none). A `reproducible` sampled row is
    verified by drafter-invariant coupling (`speculor.verify.match_accept`): its tokens are exactly the target
    alone's samples for its seed, whatever the draft, γ or batch."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    gamma: GammaPolicy | None
    eos_ids: frozenset[int]
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    max_gamma: int | None = None  # a cap from the target runner (fixed-width steps), applied to every policy
    speculative: bool = True
    logprobs: int | None = None
    reproducible: bool = False


@dataclass
class RowEvent:
    """What one step did for one request: the new tokens and text, and the final result on the row's last event."""

    request_id: int
    delta: Delta
    result: GenerationResult | None = None


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


@dataclass
class _Row:
    """A request in flight: its slot in the runners, its committed context and its bookkeeping."""

    request_id: int
    slot: int
    request: DecodeRequest
    tracker: TextTracker
    seed: int
    context: list[int]
    started: float
    stats: GenerationStats = field(default_factory=GenerationStats)
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    finish_reason: str = "length"
    logprobs: list[TokenLogprob] | None = None
    # The row's grammar matcher (structured outputs), kept across steps: it rolls back to each step's committed
    # tokens rather than replaying the whole output.
    grammar: GrammarRow | None = None

    @property
    def ready(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids) - 1


@dataclass
class _QueuedStep:
    """One step as queued on the device, rows in order: what it fed the target (`fed`: each row's pending token,
    then its drafts, right-padded), the acceptance results, and how to time it. `chained` steps were queued before
    the previous step's results reached the host (their γ was chosen then). Once the step after this one is queued
    before this one is read, the surplus (fed but not kept) is cut off the caches on the device: `dropped` (the
    target's) and `draft_dropped` say so, and the host then only settles its lengths."""

    request_ids: tuple[int, ...]
    slots: list[int]
    gammas: list[int]
    fed: torch.Tensor
    counts: torch.Tensor
    accepted: torch.Tensor
    next_tokens: torch.Tensor
    logits: torch.Tensor
    starts: torch.Tensor | None
    forwards: int
    clock: _PhaseClock
    chained: bool = False
    caught_up: bool = False
    policy_step: bool = False
    dropped: bool = False
    draft_dropped: bool = False

    @property
    def width(self) -> int:
        """Drafted positions per row (0 for a step without speculation)."""
        return self.fed.shape[1] - 1

    @property
    def drafts(self) -> torch.Tensor:
        return self.fed[:, 1:]

    def select(self, positions: list[int]) -> _QueuedStep:
        """The same step restricted to the rows at `positions` (rows that finished since it was queued left)."""
        index = host_to_device(positions, self.fed.device)
        return _QueuedStep(
            tuple(self.request_ids[i] for i in positions),
            [self.slots[i] for i in positions],
            [self.gammas[i] for i in positions],
            self.fed[index],
            self.counts[index],
            self.accepted[index],
            self.next_tokens[index],
            self.logits[index],
            self.starts[index] if self.starts is not None else None,
            self.forwards,
            self.clock,
            self.chained,
            self.caught_up,
            self.policy_step,
        )


class BatchEngine:
    """Runs many generations over one target runner (and optionally a proposer) whose slots they share. Only one
    thread may call it. `load_aware` picks γ for rows whose request leaves it to the engine (a fresh policy when
    none is given); it learns from this engine's steps, so pass the same one to engines of one decoder."""

    def __init__(
        self,
        target: Runner,
        proposer: Proposer | None,
        vocab_size: int,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        load_aware: LoadAwareGamma | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        if prefill_chunk < 1:
            raise SpeculorError(f"prefill_chunk must be ≥ 1, got {prefill_chunk}")
        self.target = target
        self.proposer = proposer
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.load_aware = load_aware if load_aware is not None else LoadAwareGamma()
        passes = getattr(proposer, "draft_passes", None)
        if passes is not None:
            self.load_aware.draft_passes = passes
        self.prefill_chunk = prefill_chunk
        self.device = target.device
        # Two clocks, since a step's phases are read only after the next step has been queued behind it.
        self._clocks = (_PhaseClock(self.device), _PhaseClock(self.device))
        self._clock_turn = 0
        self.last_gamma = 0
        self._caught_up = False
        self._planned_gamma: int | None = None
        # The next step, queued on the device before this one's results were read (`_queue_ahead`), and the pinned
        # buffer results come back through.
        self._ahead: _QueuedStep | None = None
        self._host_values: torch.Tensor | None = None
        # Look ahead where it pays: on a GPU, whose queue runs while the host works (on a CPU it only changes the
        # order of the same work; tests turn it on there to check it).
        self.look_ahead = self.device.type == "cuda"
        self.last_batch_size = 0
        self._free = list(range(target.slots))
        self._rows: dict[int, _Row] = {}
        self._next_id = 0
        # The last step's emitted tokens as they already sit on the device, with the slots they belong to: when the
        # next step runs the same rows, it feeds them without another host-to-device copy.
        self._pending: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._sampling_cache: tuple[tuple[int, ...], RowSampling] | None = None
        # The rows' logits processors, advanced step to step by what each row commits (keyed by request id).
        self._processor_state = ProcessorState()

    @property
    def capacity(self) -> int:
        return self.target.slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def running(self) -> int:
        return len(self._rows)

    def add(self, request: DecodeRequest) -> int:
        """Start a request in a free slot; returns its id. Its prompt is prefilled by the coming steps."""
        if not self._free:
            raise SpeculorError(f"all {self.capacity} slots are busy: wait for a request to finish")
        if not request.prompt_ids:
            raise SpeculorError("the prompt is empty")
        slot = self._free.pop(0)
        request_id = self._next_id
        self._next_id += 1
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        row = _Row(
            request_id,
            slot,
            request,
            TextTracker(self.tokenizer, list(request.stop)),
            seed,
            list(request.prompt_ids),
            time.perf_counter(),
            logprobs=[] if request.logprobs is not None else None,
            grammar=request.params.structured.new_row() if request.params.structured is not None else None,
        )
        self.target.reset(slot)
        if self.proposer is not None:
            self.proposer.reset(slot)
        self._rows[request_id] = row
        return request_id

    def abort(self, request_id: int) -> GenerationResult:
        """Stop a request now and free its slot; returns what it generated so far (finish reason "abort")."""
        row = self._rows.get(request_id)
        if row is None:
            raise SpeculorError(f"no running request with id {request_id}")
        row.finish_reason = "abort"
        return self._finish(row)

    def step(self) -> list[RowEvent]:
        """Prefill (a bounded chunk of) waiting prompts, then one target forward for every ready row. Returns one
        event per row that emitted tokens or finished.

        One request can never fail the others: if the batched work raises, every row's caches go back to what it
        had committed and the rows are stepped again one at a time; a row that fails alone finishes with reason
        "error" (its tokens so far stand), the others continue as if nothing happened — greedy and seeded rows
        produce exactly the tokens they would have."""
        events = self._prefill_some()
        rows = [row for row in self._rows.values() if row.ready]
        if not rows:
            return events
        try:
            return events + self._decode(rows)
        except Exception as error:
            if len(rows) == 1:
                return [*events, self._fail(rows[0], error)]
            self._restore(rows)
        for row in rows:
            try:
                events += self._decode([row])
            except Exception as error:
                events.append(self._fail(row, error))
        return events

    def _restore(self, rows: list[_Row]) -> None:
        """Cut every row's caches back to its committed context after a step that raised, and forget what the step
        left on the device."""
        self._pending = None
        self._sampling_cache = None
        self._processor_state.clear()
        self._ahead = None
        for row in rows:
            self._roll_back(row)

    def _roll_back(self, row: _Row) -> None:
        committed = len(row.context) - 1 if row.ready else row.prefilled
        self.target.rollback(row.slot, committed)
        if self.proposer is not None:
            self.proposer.rollback(row.slot, committed)

    def _fail(self, row: _Row, error: BaseException) -> RowEvent:
        """Finish a row whose own step raised: reason "error", with what failed; everything it emitted stands. Only
        its own caches are cut back: a step queued ahead for the other rows stays valid (it simply leaves this row
        out when taken)."""
        self._roll_back(row)
        row.finish_reason = "error"
        result = self._finish(row)
        result.error = f"{type(error).__name__}: {error}"
        return RowEvent(row.request_id, Delta([], ""), result)

    def _prefill_some(self) -> list[RowEvent]:
        """Feed waiting prompts (everything but their last token) to the target's cache, oldest first, at most
        `prefill_chunk` tokens per step, every row's chunk in one call (one forward where the runner can). The
        proposer reads a prompt when it first drafts for the row. A prompt another row holds already is copied, not
        prefilled again (`_share_prompts`). If the joint prefill raises, each row's chunk is retried alone and only the
        rows that still fail finish with reason "error"."""
        waiting = [row for row in self._rows.values() if len(row.request.prompt_ids) - 1 > row.prefilled]
        if not waiting:
            return []
        sharing = getattr(self.target, "copies_prefixes", False)
        budget = self.prefill_chunk
        chunks: list[tuple[_Row, int]] = []
        for row in self._share_prompts(waiting) if sharing else waiting:
            if budget == 0:
                break
            chunks.append((row, min(len(row.request.prompt_ids) - 1 - row.prefilled, budget)))
            budget -= chunks[-1][1]
        if not chunks:
            return []
        events = []
        try:
            self._prefill(chunks)
        except Exception:
            if len(chunks) > 1:
                self._restore([row for row, _ in chunks])
            else:
                self._pending = None
            for row, count in chunks:
                try:
                    self._prefill([(row, count)])
                except Exception as error:
                    events.append(self._fail(row, error))
        if sharing:
            self._share_prompts([row for row in waiting if row.request_id in self._rows])
        return events

    def _share_prompts(self, waiting: list[_Row]) -> list[_Row]:
        """Rows waiting for a prompt that another row has prefilled whole (n samples of one prompt, or the same prompt
        sent again) copy that row's cache instead (`copy_prefix`: one device copy, not a forward); of several rows
        waiting for the same prompt, only the first is prefilled, the others wait for it. Returns the rows that
        still need their own prefill."""
        held = {}
        for row in self._rows.values():
            length = len(row.request.prompt_ids) - 1
            if length > 0 and row.prefilled == length:
                held.setdefault(tuple(row.request.prompt_ids), row)
        own, first = [], set()
        for row in waiting:
            prompt = tuple(row.request.prompt_ids)
            donor = held.get(prompt) if row.prefilled == 0 else None
            if donor is not None:
                self.target.copy_prefix(donor.slot, row.slot, len(prompt) - 1)
                row.prefilled = len(prompt) - 1
            elif row.prefilled > 0 or prompt not in first:
                first.add(prompt)
                own.append(row)
        return own

    def _prefill(self, chunks: list[tuple[_Row, int]]) -> None:
        began = time.perf_counter()
        token_ids = [
            torch.tensor(row.request.prompt_ids[row.prefilled : row.prefilled + count], dtype=torch.long)
            for row, count in chunks
        ]
        self.target.extend_rows([row.slot for row, _ in chunks], [ids.to(self.device) for ids in token_ids])
        _synchronize(self.device)
        seconds = time.perf_counter() - began
        for row, count in chunks:
            row.prefilled += count
            row.stats.prefill_seconds += seconds

    def _gammas(self, rows: list[_Row]) -> list[int]:
        """γ for every row this step: 0 for rows that do not speculate; a row's own policy where it has one; the
        load-aware choice for the batch otherwise. Never past max_new_tokens (a step can emit γ + 1 tokens). A
        row's first token drafts nothing: it comes from the target alone, so speculation (the draft's prefill, its
        passes) never delays the first token."""
        caps = [self._draft_cap(row, len(row.generated)) for row in rows]
        auto = [index for index, row in enumerate(rows) if row.request.gamma is None and caps[index] > 0]
        chosen, self._planned_gamma = self._planned_gamma or 0, None
        if auto and not chosen:
            chosen = self.load_aware.choose([_acceptance_kind(rows[i]) for i in auto], [caps[i] for i in auto])
        gammas = []
        for row, cap in zip(rows, caps, strict=True):
            policy = row.request.gamma
            wanted = chosen if policy is None else policy.next_gamma()
            gammas.append(max(0, min(wanted, cap)))
        return gammas

    def _teaches_policy(self, rows: list[_Row]) -> bool:
        """Steps of rows that all leave γ to the policy teach it what steps cost, when it has something to choose."""
        return self.proposer is not None and all(row.request.gamma is None for row in rows)

    def _next_clock(self) -> _PhaseClock:
        self._clock_turn ^= 1
        return self._clocks[self._clock_turn]

    def _decode(self, rows: list[_Row]) -> list[RowEvent]:
        """One step for these rows: the step queued ahead for them by the previous call if there is one, else a
        step queued now; then, where it may, the next step is queued before this one's results are read, so the
        device runs it while the host streams, stops and finishes rows."""
        began = time.perf_counter()
        step = self._take_ahead(rows) or self._queue_step(rows)
        count, width = len(rows), step.width
        self.last_gamma, self.last_batch_size = max(step.gammas), count
        values = self._read_queueing_ahead(step, rows)
        logprobs = self._logprobs(rows, step) if step.logits is not None else None
        clock = step.clock
        draft_seconds = clock.seconds(clock.DRAFT, clock.VERIFY)
        verify_seconds = clock.seconds(clock.VERIFY, clock.DONE)
        self._pending = (tuple(step.slots), step.next_tokens[:, None])
        events = []
        learned: dict[str, list[tuple[int, int]]] = {}
        now = time.perf_counter()
        for index, row in enumerate(rows):
            proposed = values[index * width : (index + 1) * width]
            drafted = values[count * width + index]
            kept_drafts = values[count * width + count + index]
            emitted = [*proposed[:kept_drafts], values[count * width + 2 * count + index]]
            gamma = step.gammas[index]
            row.stats.draft_seconds += draft_seconds
            row.stats.verify_seconds += verify_seconds
            row.stats.draft_forwards += step.forwards if gamma else 0
            if gamma:
                # Every speculating row teaches the policy how this pair's drafts fare, whoever chose its γ.
                learned.setdefault(_acceptance_kind(row), []).append((drafted, kept_drafts))
                if row.request.gamma is not None:
                    row.request.gamma.observe(drafted, kept_drafts)
            row_logprobs = logprobs[index] if logprobs is not None else None
            try:
                events.append(self._emit(row, step, emitted, drafted, kept_drafts, row_logprobs, now))
            except Exception as error:
                events.append(self._fail(row, error))
        for kind, steps in learned.items():
            self.load_aware.observe_acceptance(kind, steps)
        seconds = time.perf_counter() - began
        if step.chained:
            if self._teaches_policy(rows):
                self.load_aware.observe_pipelined(count, self.last_gamma, seconds)
        elif step.policy_step:
            self.load_aware.observe(
                count, self.last_gamma, step.forwards, draft_seconds, verify_seconds, seconds, step.caught_up
            )
        return events

    def _queue_step(self, rows: list[_Row]) -> _QueuedStep:
        """Queue a step the host prepares from the rows' committed contexts: choose γ, draft (catching the draft up
        where it is behind), verify, accept."""
        sampling = self._sampling(rows)
        if any(row.request.params.processed for row in rows):
            sampling = sampling.with_processors(self._processors(rows))
        starts = None
        if sampling.any_sampled:
            starts = torch.tensor([len(row.context) for row in rows], dtype=torch.long, device=self.device)
        clock = self._next_clock()
        clock.mark(clock.DRAFT)
        gammas = self._gammas(rows)
        drafts, counts, draft_probs, forwards = self._propose(rows, gammas, sampling)
        step = self._verify(
            tuple(row.request_id for row in rows),
            [row.slot for row in rows],
            gammas,
            torch.cat([self._pending_tokens(rows), drafts], dim=1),
            counts,
            draft_probs,
            forwards,
            sampling,
            starts,
            clock,
        )
        step.caught_up, step.policy_step = self._caught_up, self._teaches_policy(rows)
        return step

    def _verify(
        self,
        request_ids: tuple[int, ...],
        slots: list[int],
        gammas: list[int],
        fed: torch.Tensor,
        counts: torch.Tensor,
        draft_probs: torch.Tensor | None,
        forwards: int,
        sampling: RowSampling,
        starts: torch.Tensor | None,
        clock: _PhaseClock,
    ) -> _QueuedStep:
        """The target's forward over what each row is `fed` (its pending token, then its drafts) and the acceptance,
        queued on the device: the second half of every step, prepared by the host or chained on the device."""
        clock.mark(clock.VERIFY)
        logits = self.target.step(slots, fed)[..., : self.vocab_size]
        accepted, next_tokens = self._accept(logits, fed[:, 1:], counts, draft_probs, sampling, starts)
        clock.mark(clock.DONE)
        return _QueuedStep(
            request_ids, slots, gammas, fed, counts, accepted, next_tokens, logits, starts, forwards, clock
        )

    def _accept(
        self,
        logits: torch.Tensor,
        drafts: torch.Tensor,
        counts: torch.Tensor,
        draft_probs: torch.Tensor | None,
        sampling: RowSampling,
        starts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(accepted drafts per row, the token after them), on the device. The logits processors, where a row has
        any, see at each verified position the state after the drafts before it, as the draft saw when it drew
        them."""
        if sampling.processors is not None:
            logits = sampling.processors.apply(logits, drafts)
        if starts is not None:
            return self._sampled_accept(logits, drafts, counts, draft_probs, sampling, starts)
        return greedy_accept(drafts, counts, logits) if drafts.shape[1] else self._argmax_only(logits)

    def _read_queueing_ahead(self, step: _QueuedStep, rows: list[_Row]) -> list[int]:
        """The step's results on the host — drafts, draft counts, accepted counts, next tokens — in one read. Where
        the next step may be queued first (`_plan_ahead`), the results are copied to the host without waiting,
        the next step is queued behind them, and then only the copy is waited for: the device never idles while
        the host works."""
        values = torch.cat([step.drafts.flatten(), step.counts, step.accepted, step.next_tokens])
        plan = self._plan_ahead(rows, step)
        if plan is None:
            return values.tolist()
        if self.device.type != "cuda":
            host_values = values.tolist()
            self._ahead = self._queue_ahead(rows, step, plan)
            return host_values
        if self._host_values is None or self._host_values.numel() < values.numel():
            self._host_values = torch.empty(max(values.numel(), 4 * self.capacity), dtype=torch.long, pin_memory=True)
        host = self._host_values[: values.numel()]
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._ahead = self._queue_ahead(rows, step, plan)
        copied.synchronize()
        return host.tolist()

    def _plan_ahead(self, rows: list[_Row], step: _QueuedStep) -> list[int] | None:
        """Each row's γ for the next step if it can be queued before this step's results are read, else None.

        It can on a GPU (or where tests force it), when no row wants log-probabilities (read per step) nor has
        logits processors (their state comes from the host's contexts, read per step), when some
        row may still need a token after this step, and when the next step is either a step without drafts (the
        target alone, fed each row's next token) or a step where every row drafts with a proposer that drafts
        from device-resident results (`ChainingProposer`) and every row drafted in this step too (its draft cache
        is then in step). Either way the caches must be cut on the device where this step fed drafts. Rows whose
        γ is a per-row policy other than a fixed one stop it (they learn from each step before the next). A row's
        cap assumes this step gave it all it may have (γ + 1 tokens), so the queued step never runs past
        max_new_tokens. Where the policy's choice cannot be queued now, it is kept for the next step."""
        if not self.look_ahead or any(row.request.logprobs is not None for row in rows):
            return None
        if any(row.request.params.processed for row in rows):
            return None  # their processors' state is built on the host from the committed tokens
        if all(row.request.max_new_tokens - len(row.generated) <= 1 for row in rows):
            return None  # every row ends with this step's token
        caps = [
            self._draft_cap(row, len(row.generated) + gamma + 1) for row, gamma in zip(rows, step.gammas, strict=True)
        ]
        auto = [index for index, row in enumerate(rows) if row.request.gamma is None and caps[index] > 0]
        for row, cap in zip(rows, caps, strict=True):
            if cap > 0 and row.request.gamma is not None and not isinstance(row.request.gamma, FixedGamma):
                return None
        chosen = (
            self.load_aware.choose([_acceptance_kind(rows[i]) for i in auto], [caps[i] for i in auto]) if auto else 0
        )
        plan = [
            max(0, min(chosen if row.request.gamma is None else row.request.gamma.next_gamma(), cap))
            for row, cap in zip(rows, caps, strict=True)
        ]
        drops = not step.width or getattr(self.target, "drops_on_device", False)
        if drops and not any(plan):
            return plan
        chains = getattr(self.proposer, "chains", False) and all(step.gammas)
        if drops and chains and all(plan):
            return plan
        if chosen:
            self._planned_gamma = chosen
        return None

    def _queue_ahead(self, rows: list[_Row], step: _QueuedStep, plan: list[int]) -> _QueuedStep:
        """Queue the step after `step` from its results as they sit on the device: its surplus cut off the caches
        there, each row fed the token it chose (and, drafting, the drafts the proposer chains from there)."""
        device = self.device
        surplus = step.width - step.accepted if step.width else None
        if surplus is not None:
            self.target.drop_on_device(step.slots, surplus)
            step.dropped = True
        sampling = self._sampling(rows)
        starts = step.starts + step.accepted + 1 if step.starts is not None else None
        clock = self._next_clock()
        clock.mark(clock.DRAFT)
        count, gamma = len(rows), max(plan)
        draft_probs, forwards = None, 0
        if gamma:
            proposer = self.proposer
            if surplus is not None:
                proposer.drop_on_device(step.slots, surplus)
                step.draft_dropped = True
            counts = host_to_device(plan, device)
            proposal = proposer.propose_chained(
                step.slots, step.fed, step.accepted, step.next_tokens, gamma, counts, sampling, starts
            )
            drafts, counts, draft_probs, forwards = proposal.tokens, proposal.counts, proposal.probs, proposal.forwards
        else:
            drafts = torch.zeros(count, 0, dtype=torch.long, device=device)
            counts = torch.zeros(count, dtype=torch.long, device=device)
        fed = torch.cat([step.next_tokens[:, None], drafts], dim=1)
        chained = self._verify(
            step.request_ids, step.slots, plan, fed, counts, draft_probs, forwards, sampling, starts, clock
        )
        chained.chained = True
        return chained

    def _take_ahead(self, rows: list[_Row]) -> _QueuedStep | None:
        """The step a look-ahead already queued for these rows, or None. Rows that finished since are simply left
        out; a row that joined is not covered, so the look-ahead is undone (each covered row's caches cut back to
        what it committed) and the step runs as usual."""
        step, self._ahead = self._ahead, None
        if step is None:
            return None
        position = {request_id: index for index, request_id in enumerate(step.request_ids)}
        if all(row.request_id in position for row in rows):
            if len(rows) == len(step.request_ids):
                return step
            return step.select([position[row.request_id] for row in rows])
        for row in rows:
            if row.request_id in position:
                self.target.rollback(row.slot, len(row.context) - 1)
                if step.width and self.proposer is not None:
                    self.proposer.rollback(row.slot, len(row.context) - 1)
        self._pending = None
        return None

    def _draft_cap(self, row: _Row, generated: int) -> int:
        """The most tokens the row may draft once it has `generated` tokens: none without a proposer, for a request
        that does not speculate, or for its first token (which comes from the target alone, so speculation never
        delays it); never past max_new_tokens (a step can emit γ + 1 tokens)."""
        if self.proposer is None or not row.request.speculative or generated == 0:
            return 0
        remaining = row.request.max_new_tokens - generated
        return min(remaining - 1, row.request.max_gamma or remaining)

    @staticmethod
    def _argmax_only(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`greedy_accept` of a step without drafts in two operations (per token, batch 1 is launch-bound even on a
        CPU): nothing accepted, the target's argmax next."""
        next_tokens = logits[:, 0].argmax(-1)
        return torch.zeros_like(next_tokens), next_tokens

    @staticmethod
    def _sampled_accept(
        logits: torch.Tensor,
        drafts: torch.Tensor,
        counts: torch.Tensor,
        draft_probs: torch.Tensor | None,
        sampling: RowSampling,
        starts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Acceptance for a batch with sampled rows: reproducible rows (and greedy ones, whose p is one-hot) keep the
        drafts that equal the target's own seeded samples (`match_accept`); the other sampled rows use the
        rejection rule, which accepts more but makes the tokens depend on what was drafted."""
        width = drafts.shape[1]
        target_probs = row_probabilities(logits, sampling)
        vocab = target_probs.shape[-1]
        coupled = None
        if sampling.any_reproducible:
            positions = starts[:, None] + torch.arange(width + 1, device=starts.device)
            choices = sample(target_probs, counter_uniform(sampling.seeds, positions, TARGET_STREAM, vocab))
            coupled = match_accept(drafts, counts, choices)
            if sampling.only_coupled:
                return coupled
        offsets = torch.arange(width, device=starts.device)
        uniforms = counter_uniform(sampling.seeds, starts[:, None] + offsets, ACCEPT_STREAM)
        accepted, next_distribution = stochastic_accept(drafts, counts, draft_probs, target_probs, uniforms)
        noise = counter_uniform(sampling.seeds, starts + accepted, TARGET_STREAM, vocab)
        next_tokens = sample(next_distribution, noise)
        if coupled is None:
            return accepted, next_tokens
        chosen = sampling.reproducible
        return torch.where(chosen, coupled[0], accepted), torch.where(chosen, coupled[1], next_tokens)

    def _sampling(self, rows: list[_Row]) -> RowSampling:
        """The rows' sampling parameters on the device, rebuilt only when the set of rows changes (a copy from the
        host per step would cost a device sync each)."""
        key = tuple(row.request_id for row in rows)
        if self._sampling_cache is None or self._sampling_cache[0] != key:
            params, seeds = [row.request.params for row in rows], [row.seed for row in rows]
            reproducible = [row.request.reproducible for row in rows]
            self._sampling_cache = (key, RowSampling.build(params, seeds, self.device, reproducible))
        return self._sampling_cache[1]

    def _processors(self, rows: list[_Row]) -> RowProcessors:
        """The rows' logits processors with their state after what each committed: made once per set of rows and
        advanced each step by the tokens each row committed since (`ProcessorState`); rows whose options need none
        of it pay nothing, and a batch where no row has options never gets here."""
        return self._processor_state.update(
            tuple(row.request_id for row in rows),
            [row.request.params for row in rows],
            [row.request.prompt_ids for row in rows],
            [row.generated for row in rows],
            [_end_ids(row.request) for row in rows],
            self.vocab_size,
            self.device,
            [row.grammar for row in rows],
        )

    def _propose(
        self, rows: list[_Row], gammas: list[int], sampling: RowSampling
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """Drafts (rows, width) right-padded, their counts (rows,), their q (rows, width, V) or None, and the number
        of draft-model steps. Rows with γ = 0 are left out of drafting and get no drafts."""
        device = self.device
        drafting = [index for index, gamma in enumerate(gammas) if gamma > 0]
        empty = torch.zeros(len(rows), 0, dtype=torch.long, device=device)
        no_counts = torch.zeros(len(rows), dtype=torch.long, device=device)
        self._caught_up = False
        if not drafting or self.proposer is None:
            return empty, no_counts, None, 0
        everyone = len(drafting) == len(rows)
        chosen = torch.tensor(drafting, dtype=torch.long, device=device)
        proposal = self.proposer.propose(
            [rows[i].slot for i in drafting],
            [rows[i].context for i in drafting],
            [gammas[i] for i in drafting],
            sampling if everyone else sampling.select(chosen),
            [self._confidence_threshold(rows[i]) for i in drafting],
        )
        # A step whose drafts first caught up with their contexts says nothing about what drafting costs.
        self._caught_up = proposal.caught_up
        if everyone:
            return proposal.tokens, proposal.counts, proposal.probs, proposal.forwards
        width = proposal.tokens.shape[1]
        drafts = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        drafts[chosen] = proposal.tokens
        counts = no_counts.index_copy(0, chosen, proposal.counts)
        probs = None
        if proposal.probs is not None:
            probs = torch.zeros(len(rows), width, proposal.probs.shape[-1], dtype=proposal.probs.dtype, device=device)
            probs[chosen] = proposal.probs
        return drafts, counts, probs, proposal.forwards

    @staticmethod
    def _confidence_threshold(row: _Row) -> float | None:
        return row.request.gamma.confidence_threshold if row.request.gamma is not None else None

    def _pending_tokens(self, rows: list[_Row]) -> torch.Tensor:
        """Each row's newest committed token (rows, 1): the tokens the last step emitted, still on the device, when
        this step runs the same rows; otherwise copied from the contexts."""
        slots = tuple(row.slot for row in rows)
        if self._pending is not None and self._pending[0] == slots:
            return self._pending[1]
        return torch.tensor([[row.context[-1]] for row in rows], dtype=torch.long, device=self.device)

    def _logprobs(self, rows: list[_Row], step: _QueuedStep) -> list[list[TokenLogprob]] | None:
        """The target's log-probabilities of every token each row may emit this step, for rows that asked (a second
        host read, paid only then)."""
        wanted = [row.request.logprobs for row in rows]
        if all(top is None for top in wanted):
            return None
        drafts, accepted, next_tokens, logits = step.drafts, step.accepted, step.next_tokens, step.logits
        width = drafts.shape[1]
        offsets = torch.arange(width + 1, device=self.device)
        padded = torch.cat([drafts, next_tokens[:, None]], dim=1)
        emitted = torch.where(offsets[None, :] < accepted[:, None], padded, next_tokens[:, None])
        log_probs = logits.float().log_softmax(-1)
        chosen = log_probs.gather(2, emitted[:, :, None]).squeeze(2).tolist()
        top_values, top_ids = log_probs.topk(max(top or 0 for top in wanted), dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        emitted_ids = emitted.tolist()
        result = []
        for index, top in enumerate(wanted):
            row_values = []
            for position in range(width + 1):
                shown = top or 0
                alternatives = tuple(
                    zip(top_ids[index][position][:shown], top_values[index][position][:shown], strict=True)
                )
                row_values.append(TokenLogprob(emitted_ids[index][position], chosen[index][position], alternatives))
            result.append(row_values)
        return result

    def _emit(
        self,
        row: _Row,
        step: _QueuedStep,
        emitted: list[int],
        drafted: int,
        accepted: int,
        logprobs: list[TokenLogprob] | None,
        now: float,
    ) -> RowEvent:
        """Append a row's emitted tokens, stopping at EOS (kept, as Hugging Face does), at a stop string (the token
        that completes it is kept, its text is not) or at max_new_tokens; record the step's counters; finish the row
        or roll its caches back to what it committed (or, where the step after this one was queued first, settle
        the cut already made on the device). Runs once per row per step, so the common case — no stop strings —
        takes the tokens in one slice, not one by one."""
        request, tracker = row.request, row.tracker
        remaining = request.max_new_tokens - len(row.generated)
        taken: list[int] = emitted[:remaining]
        text = ""
        eos_ids = _eos_ids(request)
        stop_ids = request.params.stop_token_ids
        if tracker.stop:
            taken = []
            for token in emitted[:remaining]:
                taken.append(token)
                row.generated.append(token)
                text += tracker.update(row.generated)
                if tracker.stopped or token in stop_ids:
                    row.finish_reason = "stop"
                    break
                if token in eos_ids:
                    row.finish_reason = "eos"
                    break
        else:
            ending = next((i for i, token in enumerate(taken) if token in eos_ids or token in stop_ids), None)
            if ending is not None:
                taken = taken[: ending + 1]
                row.finish_reason = "stop" if taken[-1] in stop_ids else "eos"
            row.generated.extend(taken)
            text = tracker.update(row.generated)
        cut_short = len(taken) < accepted + 1
        # γ as drafted: a lookup that found nothing, or a draft stopped by its confidence threshold, counts as such.
        row.stats.record_step(drafted, len(taken) if cut_short else drafted, min(accepted, len(taken)))
        row.context.extend(taken)
        if not row.stats.time_to_first_token:
            row.stats.time_to_first_token = now - row.started
        row_logprobs = logprobs[: len(taken)] if logprobs is not None else None
        if row_logprobs is not None and row.logprobs is not None:
            row.logprobs.extend(row_logprobs)
        if row.finish_reason != "length" or len(row.generated) >= request.max_new_tokens:
            text += tracker.finish(row.generated)
            result = self._finish(row)
            return RowEvent(row.request_id, Delta(taken, text, row_logprobs), result)
        row.stats.new_tokens = len(row.generated)
        row.stats.wall_seconds = now - row.started
        committed = len(row.context) - 1
        surplus = step.width + 1 - len(taken)
        if step.dropped:
            self.target.settle(row.slot, surplus)
        elif surplus:
            self.target.rollback(row.slot, committed)
        if step.draft_dropped:
            self.proposer.settle(row.slot, surplus)
        elif drafted and self.proposer is not None:
            self.proposer.rollback(row.slot, committed)
        return RowEvent(row.request_id, Delta(taken, text, row_logprobs))

    def _finish(self, row: _Row) -> GenerationResult:
        del self._rows[row.request_id]
        self._free.append(row.slot)
        self._free.sort()
        self._pending = None
        row.stats.new_tokens = len(row.generated)
        row.stats.wall_seconds = time.perf_counter() - row.started
        return GenerationResult(row.tracker.text, list(row.generated), row.stats, row.finish_reason, row.logprobs)


def _eos_ids(request: DecodeRequest) -> frozenset[int]:
    """The EOS ids that end a request: none where it ignores them. A row that follows a grammar also ends on the
    grammar's end ids, ignore_eos or not: the grammar allows them only once it is complete."""
    structure = request.params.structured
    if structure is not None:
        return request.eos_ids | structure.end_ids
    return frozenset() if request.ignore_eos else request.eos_ids


def _end_ids(request: DecodeRequest) -> frozenset[int]:
    """The ids that end a request: its EOS ids (`_eos_ids`) and its stop token ids."""
    return _eos_ids(request) | frozenset(request.params.stop_token_ids)


def _acceptance_kind(row: _Row) -> str:
    """Rows whose drafts are accepted alike, for the load-aware γ: greedy rows, seeded rows verified by coupling,
    and other sampled rows (the rejection rule)."""
    if row.request.params.greedy:
        return "greedy"
    return "coupled" if row.request.reproducible else "sampled"


class Decoding:
    """One generation in progress on an engine of its own: iterate it for `Delta`s; `result` is complete once
    iteration ends. Closing the iterator early aborts the generation and frees its slot. A generation that fails
    raises `SpeculorError` after its last delta, with `result` holding what it generated."""

    def __init__(self, engine: BatchEngine, request: DecodeRequest) -> None:
        self.engine = engine
        self.request = request
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[Delta]:
        request_id = self.engine.add(self.request)
        try:
            while self.result is None:
                for event in self.engine.step():
                    if event.request_id != request_id:
                        continue
                    if event.result is not None:
                        self.result = event.result
                    yield event.delta
            if self.result.finish_reason == "error":
                raise SpeculorError(f"generation failed: {self.result.error}")
        finally:
            if self.result is None:
                self.result = self.engine.abort(request_id)
