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

from collections.abc import Sequence
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
        window = max(lengths, default=1) - 1
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
