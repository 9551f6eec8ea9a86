"""Logits processors whose state depends on the tokens before a position: penalties, logit bias, banned words and
the end-of-sequence mask of `min_tokens`, as pure tensor functions over the rows of a batch.

Speculation makes these hard: a penalty at drafted position i depends on the tokens drafted before it, so one target
forward over γ drafts needs the processor's state as it would be after each drafted prefix. `RowProcessors` holds
each row's state after its *committed* tokens; `apply` derives the state after every drafted prefix on the fly
(counts plus the drafted tokens before the position, the recent-token window extended by them, the generated
length plus the position), so the target's p at verified position j and the draft's q at drafted position j see
the very same state — the one the target alone would have had after the same prefix. That is what keeps the
acceptance rule exact.

A grammar (`speculor.grammar`) is one more processor whose state is a matcher per row rather than a tensor: it
keeps itself in step with the committed tokens and walks the drafted prefixes on the host.

Order, per position: logit bias, then the repetition penalty (a seen token's positive logit divided by it, a
negative one multiplied, over prompt and output, as Hugging Face and vLLM do), then the frequency and presence
penalties (over generated tokens only, as OpenAI defines them), then the bans (banned words, and end ids while
fewer than `min_tokens` are generated) set to −inf, then the grammar's mask. Temperature, top-k, top-p and min-p
come after, in `speculor.sampling`. Work is in float32 (float64 for float64 logits), as the probabilities are.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from speculor.grammar import GrammarRow, RowGrammars

if TYPE_CHECKING:
    from speculor.sampling import SamplingParams

# Padding of the recent-token window before a row's first token: no token id is negative, so it matches nothing.
NO_TOKEN = -1


@dataclass(frozen=True)
class BannedContinuations:
    """Banned words of one length L ≥ 2, across the batch: where a row's last L − 1 tokens are `prefixes[i]`, the
    token `banned[i]` is banned for row `rows[i]`."""

    rows: torch.Tensor
    prefixes: torch.Tensor
    banned: torch.Tensor

    def select(self, rows: torch.Tensor) -> BannedContinuations:
        """The entries of the chosen rows, renumbered to their places in `rows` (a row may be chosen twice)."""
        matches = self.rows[None, :] == rows[:, None]
        new_rows, entries = matches.nonzero(as_tuple=True)
        return BannedContinuations(new_rows, self.prefixes[entries], self.banned[entries])


@dataclass(frozen=True)
class RowProcessors:
    """Each row's processor options and its state after its committed tokens, as device tensors (rows first).

    Options: `presence`, `frequency`, `repetition` (rows,), `bias` (rows, V) or None, `min_tokens` (rows,) with
    `end_ids` (rows, V) the ids it holds back, `always_banned` (rows, V) single-token banned words or None,
    `banned_continuations` one entry per banned-word length ≥ 2. State: `output_counts` (rows, V) how often each
    token was generated, `prompt_seen` (rows, V) whether it occurs in the prompt, `generated` (rows,) how many tokens
    were generated, `recent` (rows, H) the last H committed tokens (H = the longest banned word's length − 1);
    `grammars` the rows' grammar matchers, None when no row has one."""

    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    bias: torch.Tensor | None
    min_tokens: torch.Tensor
    end_ids: torch.Tensor | None
    always_banned: torch.Tensor | None
    banned_continuations: tuple[BannedContinuations, ...]
    output_counts: torch.Tensor | None
    prompt_seen: torch.Tensor | None
    generated: torch.Tensor
    recent: torch.Tensor
    grammars: RowGrammars | None = None

    @classmethod
    def build(
        cls,
        options: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        end_ids: Sequence[frozenset[int]],
        vocab_size: int,
        device: torch.device,
        grammars: Sequence[GrammarRow | None] = (),
    ) -> RowProcessors:
        """The rows' processors after their committed tokens (`prompts[i]` then `outputs[i]`). `end_ids[i]` are the
        ids that end row i, masked while it has generated fewer than its `min_tokens`. `grammars[i]` is row i's
        grammar matcher (None without one; the engine keeps it across steps), moved here to its committed output."""
        rows = len(options)
        penalised = any(o.presence_penalty or o.frequency_penalty or o.repetition_penalty != 1 for o in options)
        output_counts = prompt_seen = None
        if penalised:
            output_counts = torch.zeros(rows, vocab_size, dtype=torch.float32)
            prompt_seen = torch.zeros(rows, vocab_size, dtype=torch.bool)
            for row, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
                if output:
                    output_counts[row].index_add_(0, torch.tensor(output), torch.ones(len(output)))
                prompt_seen[row, torch.tensor(list(prompt), dtype=torch.long)] = True
            output_counts, prompt_seen = output_counts.to(device), prompt_seen.to(device)
        bias = None
        if any(o.logit_bias for o in options):
            bias = torch.zeros(rows, vocab_size, dtype=torch.float32)
            for row, option in enumerate(options):
                for token, value in option.logit_bias:
                    bias[row, token] = value
            bias = bias.to(device)
        held_back = None
        if any(o.min_tokens for o in options):
            held_back = torch.zeros(rows, vocab_size, dtype=torch.bool)
            for row, (option, ids) in enumerate(zip(options, end_ids, strict=True)):
                for token in ids if option.min_tokens else ():
                    if token < vocab_size:
                        held_back[row, token] = True
            held_back = held_back.to(device)
        always_banned = None
        if any(len(word) == 1 for o in options for word in o.bad_words):
            always_banned = torch.zeros(rows, vocab_size, dtype=torch.bool)
            for row, option in enumerate(options):
                for word in option.bad_words:
                    if len(word) == 1:
                        always_banned[row, word[0]] = True
            always_banned = always_banned.to(device)
        continuations = _banned_continuations(options, device)
        window = _window(continuations)
        recent = [
            ([NO_TOKEN] * window + [*prompt, *output])[len(prompt) + len(output) :] if window else []
            for prompt, output in zip(prompts, outputs, strict=True)
        ]
        row_grammars = None
        if any(grammar is not None for grammar in grammars):
            for grammar, output in zip(grammars, outputs, strict=True):
                if grammar is not None:
                    grammar.commit(output)
            row_grammars = RowGrammars(tuple(grammars))
        return cls(
            presence=torch.tensor([o.presence_penalty for o in options], dtype=torch.float32, device=device),
            frequency=torch.tensor([o.frequency_penalty for o in options], dtype=torch.float32, device=device),
            repetition=torch.tensor([o.repetition_penalty for o in options], dtype=torch.float32, device=device),
            bias=bias,
            min_tokens=torch.tensor([o.min_tokens for o in options], dtype=torch.long, device=device),
            end_ids=held_back,
            always_banned=always_banned,
            banned_continuations=tuple(continuations),
            output_counts=output_counts,
            prompt_seen=prompt_seen,
            generated=torch.tensor([len(output) for output in outputs], dtype=torch.long, device=device),
            recent=torch.tensor(recent, dtype=torch.long, device=device).view(rows, window),
            grammars=row_grammars,
        )

    def select(self, rows: torch.Tensor) -> RowProcessors:
        """The processors of a subset of rows (indices into this batch)."""

        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            return values[rows] if values is not None else None

        return replace(
            self,
            presence=self.presence[rows],
            frequency=self.frequency[rows],
            repetition=self.repetition[rows],
            bias=pick(self.bias),
            min_tokens=self.min_tokens[rows],
            end_ids=pick(self.end_ids),
            always_banned=pick(self.always_banned),
            banned_continuations=tuple(group.select(rows) for group in self.banned_continuations),
            output_counts=pick(self.output_counts),
            prompt_seen=pick(self.prompt_seen),
            generated=self.generated[rows],
            recent=self.recent[rows],
            grammars=self.grammars.select(rows) if self.grammars is not None else None,
        )

    def apply(self, logits: torch.Tensor, drafted: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Process logits (rows, P, V): position j is the next token's logits after the row's committed tokens and
        its first `offset + j` drafted tokens `drafted` (rows, ≥ offset + P − 1). Returns new float32 logits
        (float64 for float64 input); rows without options come out with their values unchanged (bias 0, penalties
        off: x + 0, x · 1 and x − 0 are x exactly)."""
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logits = logits.to(dtype, copy=True)
        positions = logits.shape[1]
        device = logits.device
        prefix_lengths = offset + torch.arange(positions, device=device)
        if self.bias is not None:
            logits += self.bias[:, None, :].to(dtype)
        if self.output_counts is not None and self.prompt_seen is not None:
            counts = _counts_after_prefixes(self.output_counts, drafted, offset, prefix_lengths)
            seen = self.prompt_seen[:, None, :] | (counts > 0)
            repetition = self.repetition.to(dtype)[:, None, None]
            penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
            logits = torch.where(seen, penalised, logits)
            logits -= self.frequency.to(dtype)[:, None, None] * counts.to(dtype)
            logits -= self.presence.to(dtype)[:, None, None] * (counts > 0).to(dtype)
        if self.always_banned is not None:
            logits.masked_fill_(self.always_banned[:, None, :], float("-inf"))
        if self.end_ids is not None:
            too_early = (self.generated[:, None] + prefix_lengths[None, :]) < self.min_tokens[:, None]
            logits.masked_fill_(too_early[:, :, None] & self.end_ids[:, None, :], float("-inf"))
        if self.banned_continuations:
            self._ban_continuations(logits, drafted, prefix_lengths)
        if self.grammars is not None:
            self.grammars.mask(logits, drafted, offset)
        return logits

    def _ban_continuations(self, logits: torch.Tensor, drafted: torch.Tensor, prefix_lengths: torch.Tensor) -> None:
        """Set −inf where a row's tokens before a position end with a banned word's prefix, at that word's last
        token. Each position reads its own window of committed-then-drafted tokens. Bans add −inf (accumulated), so
        two words banning the same token at the same place cannot overwrite each other."""
        window = self.recent.shape[1]
        history = torch.cat([self.recent, drafted], dim=1)
        positions = prefix_lengths.shape[0]
        for group in self.banned_continuations:
            if group.rows.numel() == 0:
                continue
            length = group.prefixes.shape[1]
            starts = window + prefix_lengths - length
            index = starts[:, None] + torch.arange(length, device=logits.device)
            windows = history[group.rows][:, index]
            hit = (windows == group.prefixes[:, None, :]).all(-1)
            places = torch.arange(positions, device=logits.device)[None, :].expand_as(hit)
            penalty = torch.where(hit, float("-inf"), 0.0).to(logits.dtype)
            logits.index_put_(
                (group.rows[:, None].expand_as(hit), places, group.banned[:, None].expand_as(hit)),
                penalty,
                accumulate=True,
            )


def _counts_after_prefixes(
    output_counts: torch.Tensor, drafted: torch.Tensor, offset: int, prefix_lengths: torch.Tensor
) -> torch.Tensor:
    """(rows, P, V): the generated-token counts after the committed tokens and each position's drafted prefix (the
    first `prefix_lengths[j]` drafted tokens, j < P; the widest is offset + P − 1, known on the host)."""
    rows, vocab = output_counts.shape
    positions = prefix_lengths.shape[0]
    counts = output_counts[:, None, :].expand(rows, positions, vocab).clone()
    width = offset + positions - 1
    if width > 0:
        included = torch.arange(width, device=drafted.device)[None, :] < prefix_lengths[:, None]
        counts.scatter_add_(
            2,
            drafted[:, None, :width].expand(rows, positions, width),
            included[None].expand(rows, positions, width).to(counts.dtype),
        )
    return counts


class ProcessorState:
    """The processors of a changing batch of rows, kept from one step to the next so that a step pays for what
    changed rather than for the rows' whole contexts and vocabularies.

    `RowProcessors.build` makes every (rows, V) tensor on the host and copies it to the device, and recounts each
    row's whole prompt and output: per step, with 64 rows of a 128k vocabulary, tens of MB zeroed and copied and
    O(context) work per row. Here the parts that never change while the rows stay the same (options, bias, the
    end-id and banned-word masks, banned continuations, the prompt's tokens) are made once per row set, on the
    device, from only their non-zero entries; the output counts are advanced by the tokens each row committed since
    the last update; `generated` and `recent` (a few numbers per row) are remade, all of a step's numbers in one
    copy to the device. When the row set changes, the rows that stay keep their prompt and output state (gathered
    on the device) and only the rows that join are counted from their contexts.

    `keys` name the rows (the engine: request ids). A key stands for one row for good: its options, prompt, end ids
    and grammar never change, and its output only grows. The result is the same, tensor for tensor, as
    `RowProcessors.build` over the same arguments. It shares its output counts with this state, which advances them
    in place: it is good until the next `update` (the engine uses it within one step)."""

    def __init__(self) -> None:
        self._keys: tuple[Hashable, ...] = ()
        self._processors: RowProcessors | None = None
        # How many of each row's output tokens `_processors.output_counts` holds.
        self._counted: list[int] = []
        self._window = 0
        self._vocab_size = 0
        self._device: torch.device | None = None

    def clear(self) -> None:
        """Forget every row: the next update builds from the contexts (after a step that raised, say)."""
        self._keys, self._processors, self._counted, self._window = (), None, [], 0

    def update(
        self,
        keys: Sequence[Hashable],
        options: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        end_ids: Sequence[frozenset[int]],
        vocab_size: int,
        device: torch.device,
        grammars: Sequence[GrammarRow | None] = (),
    ) -> RowProcessors:
        """The rows' processors after their committed tokens, as `RowProcessors.build` gives them (same arguments,
        plus each row's key). Each grammar is moved to its row's committed output, as there."""
        keys = tuple(keys)
        try:
            if (
                self._processors is None
                or keys != self._keys
                or vocab_size != self._vocab_size
                or device != self._device
            ):
                self._start(keys, options, prompts, outputs, end_ids, vocab_size, device)
            processors = self._advance(prompts, outputs, device)
            row_grammars = None
            if any(grammar is not None for grammar in grammars):
                for grammar, output in zip(grammars, outputs, strict=True):
                    if grammar is not None:
                        grammar.commit(output)
                row_grammars = RowGrammars(tuple(grammars))
        except BaseException:
            # Half an update would leave counts that disagree with `_counted`: start again next time.
            self.clear()
            raise
        return replace(processors, grammars=row_grammars)

    def _start(
        self,
        keys: tuple[Hashable, ...],
        options: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
        end_ids: Sequence[frozenset[int]],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        """Make the parts that last as long as this row set; carry over the prompt and output state of the rows
        that were already there (their counts then advance from where they were), and mark the others as having
        nothing counted."""
        rows = len(options)
        previous = self._processors
        same_space = previous is not None and vocab_size == self._vocab_size and device == self._device
        bias_entries = [
            (row, token, value) for row, o in enumerate(options) for token, value in dict(o.logit_bias).items()
        ]
        held_entries = [
            (row, token)
            for row, (option, ids) in enumerate(zip(options, end_ids, strict=True))
            if option.min_tokens
            for token in sorted(ids)
            if token < vocab_size
        ]
        banned_entries = [
            (row, token)
            for row, option in enumerate(options)
            for token in sorted({word[0] for word in option.bad_words if len(word) == 1})
        ]
        _check_in_vocabulary([token for _, token, _ in bias_entries], vocab_size, "logit_bias")
        _check_in_vocabulary([token for _, token in banned_entries], vocab_size, "bad_words")
        penalised = any(o.presence_penalty or o.frequency_penalty or o.repetition_penalty != 1 for o in options)
        # Rows whose prompt and output state the previous set holds, as (new place, old place) in ascending new
        # place; the others start from their contexts.
        kept: list[tuple[int, int]] = []
        counted = [0] * rows
        if penalised and same_space and previous is not None and previous.output_counts is not None:
            places = {key: place for place, key in enumerate(self._keys)}
            for row, (key, output) in enumerate(zip(keys, outputs, strict=True)):
                place = places.get(key)
                if place is not None and self._counted[place] <= len(output):
                    kept.append((row, place))
                    counted[row] = self._counted[place]
        carried = {row for row, _ in kept}
        fresh_prompts = [(row, token) for row in range(rows) if row not in carried for token in prompts[row]]
        floats = _upload(
            device,
            torch.float32,
            [o.presence_penalty for o in options],
            [o.frequency_penalty for o in options],
            [o.repetition_penalty for o in options],
            [value for _, _, value in bias_entries],
        )
        longs = _upload(
            device,
            torch.long,
            [o.min_tokens for o in options],
            *_columns(bias_entries, 2),
            *_columns(held_entries, 2),
            *_columns(banned_entries, 2),
            *_columns(fresh_prompts, 2),
            *_columns(kept, 2),
        )
        presence, frequency, repetition, bias_values = floats
        min_tokens, bias_rows, bias_tokens, held_rows, held_tokens = longs[:5]
        banned_rows, banned_tokens, prompt_rows, prompt_tokens, kept_rows, kept_places = longs[5:]
        bias = held_back = always_banned = output_counts = prompt_seen = None
        if any(o.logit_bias for o in options):
            bias = torch.zeros(rows, vocab_size, dtype=torch.float32, device=device)
            bias[bias_rows, bias_tokens] = bias_values
        if any(o.min_tokens for o in options):
            held_back = _mask(rows, vocab_size, device, held_rows, held_tokens)
        if any(len(word) == 1 for o in options for word in o.bad_words):
            always_banned = _mask(rows, vocab_size, device, banned_rows, banned_tokens)
        if penalised:
            old_counts = previous.output_counts if previous is not None else None
            old_seen = previous.prompt_seen if previous is not None else None
            output_counts = _carry(old_counts, kept, kept_rows, kept_places, rows, vocab_size, torch.float32, device)
            prompt_seen = _carry(old_seen, kept, kept_rows, kept_places, rows, vocab_size, torch.bool, device)
            prompt_seen[prompt_rows, prompt_tokens] = True
        continuations = _banned_continuations(options, device)
        nothing = torch.zeros(0, dtype=torch.long, device=device)  # `generated` and `recent`: set by `_advance`
        self._processors = RowProcessors(
            presence=presence,
            frequency=frequency,
            repetition=repetition,
            bias=bias,
            min_tokens=min_tokens,
            end_ids=held_back,
            always_banned=always_banned,
            banned_continuations=continuations,
            output_counts=output_counts,
            prompt_seen=prompt_seen,
            generated=nothing,
            recent=nothing,
        )
        self._keys, self._counted, self._window = keys, counted, _window(continuations)
        self._vocab_size, self._device = vocab_size, device

    def _advance(
        self, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], device: torch.device
    ) -> RowProcessors:
        """Count the tokens each row committed since the last update (in place) and remake `generated` and
        `recent`: one copy to the device of a few numbers per row."""
        processors = self._processors
        assert processors is not None
        rows, window = len(outputs), self._window
        lengths = [len(output) for output in outputs]
        recent = [
            token for prompt, output in zip(prompts, outputs, strict=True) for token in _last(prompt, output, window)
        ]
        new_rows: list[int] = []
        new_tokens: list[int] = []
        if processors.output_counts is not None:
            for row, (output, counted) in enumerate(zip(outputs, self._counted, strict=True)):
                tokens = _tokens_since(output, counted)
                new_rows += [row] * len(tokens)
                new_tokens += tokens
        generated, recent_ids, count_rows, count_tokens = _upload(
            device, torch.long, lengths, recent, new_rows, new_tokens
        )
        if new_tokens and processors.output_counts is not None:
            ones = torch.ones(len(new_tokens), dtype=torch.float32, device=device)
            processors.output_counts.index_put_((count_rows, count_tokens), ones, accumulate=True)
        self._counted = lengths
        self._processors = replace(processors, generated=generated, recent=recent_ids.view(rows, window))
        return self._processors


def _tokens_since(output: Sequence[int], counted: int) -> list[int]:
    """The output tokens after the first `counted`: those a row committed since its counts were last advanced."""
    return list(output[counted:])


def _last(prompt: Sequence[int], output: Sequence[int], window: int) -> list[int]:
    """The last `window` tokens of prompt then output, padded on the left with `NO_TOKEN`; O(window), not
    O(context)."""
    if not window:
        return []
    tail = [*prompt[-window:], *output[-window:]][-window:]
    return [NO_TOKEN] * (window - len(tail)) + tail


def _upload(device: torch.device, dtype: torch.dtype, *parts: Sequence[int] | Sequence[float]) -> list[torch.Tensor]:
    """The lists on the device in one copy (a copy costs far more than its bytes), as views of one tensor."""
    flat = torch.tensor([value for part in parts for value in part], dtype=dtype).to(device)
    return list(flat.split([len(part) for part in parts]))


def _columns(entries: Sequence[tuple], width: int) -> list[list[int]]:
    """The first `width` columns of the entries (as many lists even with no entry)."""
    return [[entry[column] for entry in entries] for column in range(width)]


def _mask(
    rows: int, vocab_size: int, device: torch.device, at_rows: torch.Tensor, at_tokens: torch.Tensor
) -> torch.Tensor:
    mask = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
    mask[at_rows, at_tokens] = True
    return mask


def _carry(
    previous: torch.Tensor | None,
    kept: Sequence[tuple[int, int]],
    rows_to: torch.Tensor,
    rows_from: torch.Tensor,
    rows: int,
    vocab_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """(rows, V): the `kept` rows (new place, old place; `rows_to` and `rows_from` their columns on the device)
    copied from the previous batch, the other rows zero. Where the kept rows come first — rows join at the end, as
    in the engine, whose rows are in the order they were added — one gather into place and zeros for the rest."""
    if previous is None or not kept:
        return torch.zeros(rows, vocab_size, dtype=dtype, device=device)
    if all(new == place for place, (new, _) in enumerate(kept)):
        values = torch.empty(rows, vocab_size, dtype=dtype, device=device)
        torch.index_select(previous, 0, rows_from, out=values[: len(kept)])
        values[len(kept) :].zero_()
        return values
    values = torch.zeros(rows, vocab_size, dtype=dtype, device=device)
    values[rows_to] = previous[rows_from]
    return values


def _check_in_vocabulary(tokens: Sequence[int], vocab_size: int, what: str) -> None:
    """Refuse on the host an id a device index would fault on (`SpeculativeDecoder.request` checks them first)."""
    outside = [token for token in tokens if not 0 <= token < vocab_size]
    if outside:
        raise IndexError(f"{what} names token {outside[0]}, outside the vocabulary of {vocab_size}")


def _banned_continuations(options: Sequence[SamplingParams], device: torch.device) -> tuple[BannedContinuations, ...]:
    """The rows' banned words of two tokens or more, one entry per length (shortest first)."""
    lengths = sorted({len(word) for o in options for word in o.bad_words if len(word) > 1})
    continuations = []
    for length in lengths:
        entries = [(row, word) for row, o in enumerate(options) for word in o.bad_words if len(word) == length]
        continuations.append(
            BannedContinuations(
                torch.tensor([row for row, _ in entries], dtype=torch.long, device=device),
                torch.tensor([word[:-1] for _, word in entries], dtype=torch.long, device=device),
                torch.tensor([word[-1] for _, word in entries], dtype=torch.long, device=device),
            )
        )
    return tuple(continuations)


def _window(continuations: Sequence[BannedContinuations]) -> int:
    """How many committed tokens the banned words look back over: the longest word's length − 1."""
    return max((group.prefixes.shape[1] for group in continuations), default=0)
