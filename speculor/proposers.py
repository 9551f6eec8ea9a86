"""Proposers: where drafted tokens come from, behind one small protocol, for every row of a batch at once.

A proposer sees each row's committed context (prompt plus everything emitted, the last token not yet fed to any
model) and returns up to γ tokens per row together with the exact distribution q each was drawn from. Rows live in
slots (the same slot numbers as the target runner's); after verification the engine tells the proposer how much of
a row's context survives (`rollback`), so it can resync its own state. A proposer reads the prompt from the context
when it first drafts for a row: a row that never drafts (γ = 0 under load, or a target-alone request) costs it
nothing, not even a prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from speculor.runners.base import Runner
from speculor.sampling import DRAFT_STREAM, RowSampling, sample_rows


@dataclass
class Proposal:
    """`tokens` (rows, γ) on the target's device, right-padded with zeros past each row's `counts` (rows,);
    `probs` (rows, γ, V) the q each token was sampled from, or None when q is one-hot at each token (greedy
    drafting or a deterministic lookup); `forwards` counts draft-model steps; `caught_up` says whether some row's
    draft cache first had to catch up with its context (a prompt, or steps without drafting), one-off work that does
    not say what drafting costs."""

    tokens: torch.Tensor
    counts: torch.Tensor
    probs: torch.Tensor | None
    forwards: int
    caught_up: bool = False


class Proposer(Protocol):
    def reset(self, slot: int) -> None:
        """A new sequence starts in `slot`."""
        ...

    def propose(
        self,
        slots: Sequence[int],
        contexts: Sequence[list[int]],
        gammas: Sequence[int],
        sampling: RowSampling,
        confidence_thresholds: Sequence[float | None],
    ) -> Proposal:
        """Draft up to `gammas[i]` (≥ 1) tokens continuing `contexts[i]` for every row. A row with a confidence
        threshold stops after a token whose draft probability falls below it (Hugging Face's
        `assistant_confidence_threshold`)."""
        ...

    def rollback(self, slot: int, committed_length: int) -> None:
        """Only the first `committed_length` tokens of the slot's context are still valid."""
        ...


class ChainingProposer(Proposer, Protocol):
    """An optional capability of a proposer: drafting for a step whose predecessor's results are still on the
    device (`DraftModelProposer.propose_chained`), so the engine can queue step n + 1 before it reads step n and the
    device never waits for the host. `chains` says whether it can at the moment (its runner must cut caches on the
    device: `drop_on_device`, later `settle`d on the host)."""

    @property
    def chains(self) -> bool: ...

    def propose_chained(
        self,
        slots: Sequence[int],
        previous: torch.Tensor,
        accepted: torch.Tensor,
        next_tokens: torch.Tensor,
        gamma: int,
        counts: torch.Tensor,
        sampling: RowSampling,
        positions: torch.Tensor | None,
    ) -> Proposal: ...

    def drop_on_device(self, slots: Sequence[int], surplus: torch.Tensor) -> None: ...

    def settle(self, slot: int, count: int) -> None: ...


class DraftModelProposer:
    """A small causal LM drafting autoregressively for all rows at once with its own KV caches.

    A row's draft cache holds every committed token except the newest; when all of a row's drafts were accepted the
    draft never saw the last one, so the next proposal feeds two tokens instead of one (rows that need one are
    padded in that first step, and the padding is rolled back). A row that is further behind — its first proposal,
    which prefills its prompt, or after steps without drafting (γ = 0) — first catches up with an `extend`.
    """

    def __init__(self, runner: Runner, vocab_size: int) -> None:
        self.runner = runner
        self.vocab_size = vocab_size

    def draft_passes(self, gamma: int) -> int:
        """Draft forwards a step of `gamma` tokens costs: one per token (for the load-aware γ policy)."""
        return gamma

    def reset(self, slot: int) -> None:
        self.runner.reset(slot)

    def propose(
        self,
        slots: Sequence[int],
        contexts: Sequence[list[int]],
        gammas: Sequence[int],
        sampling: RowSampling,
        confidence_thresholds: Sequence[float | None],
    ) -> Proposal:
        runner, device = self.runner, self.runner.device
        behind = [len(context) - runner.length(slot) for slot, context in zip(slots, contexts, strict=True)]
        catching_up = [index for index, count in enumerate(behind) if count > 2]
        if catching_up:
            runner.extend_rows(
                [slots[i] for i in catching_up],
                [torch.tensor(contexts[i][-behind[i] : -2], dtype=torch.long, device=device) for i in catching_up],
            )
        missing = [min(count, 2) for count in behind]
        width, rows, gamma = max(missing), len(slots), max(gammas)
        # Every per-row input of the proposal in one host-to-device copy, made while the device is idle (a copy
        # from host memory waits for the device's queued work).
        feed_rows = [context[-need:] + [0] * (width - need) for context, need in zip(contexts, missing, strict=True)]
        host_inputs = [token for row in feed_rows for token in row]
        host_inputs += [*gammas, *(len(context) for context in contexts), *(need - 1 for need in missing)]
        inputs = torch.tensor(host_inputs, dtype=torch.long, device=device)
        feed = inputs[: rows * width].view(rows, width)
        counts, positions, last_index = inputs[rows * width :].view(3, rows)
        thresholds = None
        if any(threshold is not None for threshold in confidence_thresholds):
            thresholds = torch.tensor([t if t is not None else 0.0 for t in confidence_thresholds], device=device)
        logits = runner.step(slots, feed)
        if min(missing) == width:
            last = logits[:, -1]
        else:
            last = logits[torch.arange(rows, device=device), last_index]
            for slot, context, need in zip(slots, contexts, missing, strict=True):
                if need < width:
                    runner.rollback(slot, len(context))
        proposal = self._draft_onwards(slots, last, gamma, counts, sampling, positions, thresholds)
        proposal.caught_up = bool(catching_up)
        return proposal

    @property
    def chains(self) -> bool:
        """Whether `propose_chained` may be used: the draft runner can cut its caches on the device."""
        return bool(getattr(self.runner, "drops_on_device", False))

    def propose_chained(
        self,
        slots: Sequence[int],
        previous: torch.Tensor,
        accepted: torch.Tensor,
        next_tokens: torch.Tensor,
        gamma: int,
        counts: torch.Tensor,
        sampling: RowSampling,
        positions: torch.Tensor | None,
    ) -> Proposal:
        """Draft for the step after one whose results are still on the device, without the host reading them: the
        rows are those of that step, every one of which drafted, and each row's draft cache has already been cut
        (`drop_on_device`) to all but its two newest committed tokens. `previous` (rows, width + 1) is what that
        step fed the target (the pending token, then the drafts), `accepted` how many drafts each row kept and
        `next_tokens` the target's token after them: the two newest tokens are `previous[accepted]` and the next
        token, fed together at the row's own positions (for a row that drafted past them, the first of the two is
        recomputed: same token, same position). `gamma` drafts are made per row, `counts` (rows, on the device,
        each ≤ γ) says how many of them each row keeps; `positions` (rows,) are the rows' context lengths on the
        device, for sampled rows' noise (None when no row samples)."""
        before = previous.gather(1, accepted[:, None])
        last = self.runner.step(slots, torch.cat([before, next_tokens[:, None]], dim=1))[:, -1]
        return self._draft_onwards(slots, last, gamma, counts, sampling, positions, None)

    def drop_on_device(self, slots: Sequence[int], surplus: torch.Tensor) -> None:
        """Cut `surplus[i]` tokens off `slots[i]`'s draft cache on the device (see `FastRunner.drop_on_device`)."""
        self.runner.drop_on_device(slots, surplus)

    def settle(self, slot: int, count: int) -> None:
        """The host learns how many tokens `drop_on_device` cut off `slot`."""
        self.runner.settle(slot, count)

    def _draft_onwards(
        self,
        slots: Sequence[int],
        last: torch.Tensor,
        gamma: int,
        counts: torch.Tensor,
        sampling: RowSampling,
        positions: torch.Tensor | None,
        thresholds: torch.Tensor | None,
    ) -> Proposal:
        """γ tokens per row, autoregressively from the draft's logits `last` (rows, V) at each row's newest
        token; each token is fed back except the last (the target verifies it; if it is accepted, the next
        proposal feeds it). With `thresholds`, drafting ends early once every row drew a token it doubted."""
        runner = self.runner
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for index in range(gamma):
            at = positions + index if sampling.any_sampled else positions
            token, token_probs = sample_rows(last[:, : self.vocab_size], sampling, at, DRAFT_STREAM, tokens)
            tokens.append(token)
            if token_probs is not None:
                probs.append(token_probs)
            if thresholds is not None and index + 1 < gamma:
                source = token_probs if token_probs is not None else last[:, : self.vocab_size].float().softmax(-1)
                doubtful = source.gather(1, token[:, None]).squeeze(1) < thresholds
                counts = torch.where(doubtful, torch.minimum(counts, torch.full_like(counts, index + 1)), counts)
                # A host read per drafted token, paid only where a threshold is set: it saves the draft steps
                # once every row has stopped.
                if bool((counts <= index + 1).all()):
                    break
            if index + 1 < gamma:
                last = runner.step(slots, token[:, None])[:, 0]
        return Proposal(
            tokens=torch.stack(tokens, dim=1),
            counts=counts,
            probs=torch.stack(probs, dim=1) if probs else None,
            forwards=len(tokens),
        )

    def rollback(self, slot: int, committed_length: int) -> None:
        self.runner.rollback(slot, committed_length)


class PromptLookupProposer:
    """Draft-free speculation: find the latest earlier occurrence of a row's last n tokens (n from `max_ngram` down
    to 1) and propose the tokens that followed it, as Hugging Face's prompt lookup does. The proposal is
    deterministic, so q is one-hot at each proposed token."""

    def __init__(self, max_ngram: int, device: torch.device) -> None:
        if max_ngram < 1:
            raise ValueError(f"ngram size must be ≥ 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.device = device

    def draft_passes(self, gamma: int) -> int:
        """Draft forwards a step costs: none, the lookup runs no model."""
        return 0

    def reset(self, slot: int) -> None:
        """Nothing to prepare: the lookup reads the context afresh each step."""

    def propose(
        self,
        slots: Sequence[int],
        contexts: Sequence[list[int]],
        gammas: Sequence[int],
        sampling: RowSampling,
        confidence_thresholds: Sequence[float | None],
    ) -> Proposal:
        continuations = [
            find_continuation(np.asarray(context, dtype=np.int64), self.max_ngram, gamma)
            for context, gamma in zip(contexts, gammas, strict=True)
        ]
        width = max(len(found) for found in continuations)
        padded = [found + [0] * (width - len(found)) for found in continuations]
        return Proposal(
            tokens=torch.tensor(padded, dtype=torch.long, device=self.device),
            counts=torch.tensor([len(found) for found in continuations], dtype=torch.long, device=self.device),
            probs=None,
            forwards=0,
        )

    def rollback(self, slot: int, committed_length: int) -> None:
        """Stateless: nothing to resync."""


def find_continuation(context: np.ndarray, max_ngram: int, gamma: int) -> list[int]:
    """The up to `gamma` tokens that followed the most recent earlier match of the context's final n-gram, trying
    n from `max_ngram` down to 1. Candidates are the earlier positions of the last token, found in one pass; longer
    matches are then checked only there, so a step costs O(context) rather than O(context × n)."""
    length = len(context)
    ends = np.flatnonzero(context[: length - 1] == context[-1])
    for size in range(min(max_ngram, length - 1), 0, -1):
        matches = ends[ends >= size - 1]
        for back in range(1, size):
            matches = matches[context[matches - back] == context[length - 1 - back]]
        if matches.size:
            start = int(matches[-1]) + 1
            return context[start : start + gamma].tolist()
    return []


PARALLEL_DRAFT_KEY = "speculor_parallel_draft"


@dataclass(frozen=True)
class ParallelDraftSpec:
    """The marker `speculor train-parallel` writes into a parallel draft's config.json: the id of its mask token (one
    past the vocabulary it shares with the target, so the target never sees it) and the most tokens it was trained
    to propose in one forward (`max_gamma`, K)."""

    mask_token_id: int
    max_gamma: int

    @classmethod
    def from_config(cls, config: object) -> ParallelDraftSpec | None:
        """The spec of a model config that carries the marker, else None (an ordinary draft)."""
        marker = getattr(config, PARALLEL_DRAFT_KEY, None)
        if not isinstance(marker, dict):
            return None
        return cls(mask_token_id=int(marker["mask_token_id"]), max_gamma=int(marker["max_gamma"]))

    def to_config(self) -> dict[str, int]:
        return {"mask_token_id": self.mask_token_id, "max_gamma": self.max_gamma}


class ParallelDraftProposer:
    """A parallel draft (PARD, arXiv 2504.18583): one draft forward proposes all of a row's γ tokens.

    The draft was trained to read its context followed by γ − 1 mask tokens and to predict, at the last real
    position and at each mask, the tokens 1, 2, …, γ ahead. So a step feeds each row the committed tokens its cache
    lacks, then γ − 1 mask ids, and reads γ distributions at once; afterwards the cache is rolled back to the real
    tokens only (the masks' keys and values must never be attended to as if they were tokens). The drafted tokens
    were never fed as real tokens, so the next step re-feeds the accepted ones together with the target's token:
    up to K + 1 real tokens a row, in the same single forward. Each token is drawn from its own q independently of
    the others, which is all the acceptance rule needs (q_i is the law x_i was drawn from, given the prefix).

    γ is capped at the draft's `max_gamma` (it was never trained to fill more masks); rows are padded with mask ids
    to the widest row, and a row whose padded step would run past the draft's context goes in a step of its own.
    """

    def __init__(self, runner: Runner, vocab_size: int, spec: ParallelDraftSpec) -> None:
        if spec.max_gamma < 1:
            raise ValueError(f"a parallel draft proposes at least one token, got max_gamma={spec.max_gamma}")
        if spec.mask_token_id >= runner.vocab_size:
            raise ValueError(f"mask token {spec.mask_token_id} is outside the draft's {runner.vocab_size} logits")
        self.runner = runner
        self.vocab_size = vocab_size
        self.spec = spec

    def draft_passes(self, gamma: int) -> int:
        """Draft forwards a step of `gamma` tokens costs: one, whatever γ (for the load-aware γ policy)."""
        return 1 if gamma > 0 else 0

    def step_widths(self, max_gamma: int) -> range:
        """Every number of tokens a draft step can feed when γ ≤ `max_gamma`: up to K + 1 real tokens plus
        min(γ, K) − 1 masks (for warming the runner's step shapes up)."""
        return range(1, self.spec.max_gamma + min(max_gamma, self.spec.max_gamma) + 1)

    def reset(self, slot: int) -> None:
        self.runner.reset(slot)

    def propose(
        self,
        slots: Sequence[int],
        contexts: Sequence[list[int]],
        gammas: Sequence[int],
        sampling: RowSampling,
        confidence_thresholds: Sequence[float | None],
    ) -> Proposal:
        runner, device, mask = self.runner, self.runner.device, self.spec.mask_token_id
        rows = len(slots)
        behind = [len(context) - runner.length(slot) for slot, context in zip(slots, contexts, strict=True)]
        # After a drafting step a row lacks at most K + 1 tokens (the accepted drafts and the target's token); a row
        # further behind (its prompt, or steps without drafting) first catches up with all but its newest token.
        catching_up = [index for index, count in enumerate(behind) if count > self.spec.max_gamma + 1]
        if catching_up:
            runner.extend_rows(
                [slots[i] for i in catching_up],
                [torch.tensor(contexts[i][-behind[i] : -1], dtype=torch.long, device=device) for i in catching_up],
            )
            for index in catching_up:
                behind[index] = 1
        drafted = [min(gamma, self.spec.max_gamma) for gamma in gammas]
        needs = [count + gamma - 1 for count, gamma in zip(behind, drafted, strict=True)]
        width, gamma = max(needs), max(drafted)
        starts = [len(context) - count for context, count in zip(contexts, behind, strict=True)]
        feed_rows = [
            context[-count:] + [mask] * (width - count) for context, count in zip(contexts, behind, strict=True)
        ]
        # A row's γ distributions sit at its last real token and the masks after it; a row drafting fewer than the
        # widest reads padding past its count, which the verifier never looks at.
        read_at = [[min(count - 1 + offset, width - 1) for offset in range(gamma)] for count in behind]
        host_inputs = [token for row in feed_rows for token in row]
        host_inputs += [index for row in read_at for index in row]
        host_inputs += [*drafted, *(len(context) for context in contexts)]
        inputs = torch.tensor(host_inputs, dtype=torch.long, device=device)
        feed = inputs[: rows * width].view(rows, width)
        read_index = inputs[rows * width : rows * (width + gamma)].view(rows, gamma)
        counts, positions = inputs[rows * (width + gamma) :].view(2, rows)
        logits = self._step(slots, feed, starts)
        for slot, context, count in zip(slots, contexts, behind, strict=True):
            if width > count:
                runner.rollback(slot, len(context))
        row_index = torch.arange(rows, device=device)
        drafting_logits = logits[row_index[:, None], read_index][..., : self.vocab_size]
        # Token i of a row is drawn at sequence position len(context) + i, as the sequential draft draws it.
        offsets = torch.arange(gamma, device=device)
        if sampling.processors is not None:
            tokens, probs = self._draw_processed(drafting_logits, sampling, positions)
        else:
            every_row = row_index.repeat_interleave(gamma)
            flat_tokens, flat_probs = sample_rows(
                drafting_logits.reshape(rows * gamma, -1),
                sampling.select(every_row) if sampling.any_sampled else sampling,
                (positions[:, None] + offsets).reshape(-1),
                DRAFT_STREAM,
            )
            tokens = flat_tokens.view(rows, gamma)
            probs = flat_probs.view(rows, gamma, -1) if flat_probs is not None else None
        if any(threshold is not None for threshold in confidence_thresholds):
            thresholds = torch.tensor([t if t is not None else 0.0 for t in confidence_thresholds], device=device)
            source = probs if probs is not None else drafting_logits.float().softmax(-1)
            doubtful = source.gather(2, tokens[:, :, None]).squeeze(2) < thresholds[:, None]
            # Stop after the first doubtful token, as the sequential draft does (that token is still proposed).
            first_doubt = torch.where(doubtful, offsets, gamma).amin(1)
            counts = torch.minimum(counts, first_doubt + 1)
        return Proposal(tokens=tokens, counts=counts, probs=probs, forwards=1, caught_up=bool(catching_up))

    @staticmethod
    def _draw_processed(
        drafting_logits: torch.Tensor, sampling: RowSampling, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw the γ tokens one after another where logits processors are on: the processors' state at token i
        depends on the tokens drawn before it, so q_i is the processed distribution given them (still the exact law
        each token was drawn from, which is all the acceptance rule needs)."""
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for index in range(drafting_logits.shape[1]):
            token, token_probs = sample_rows(
                drafting_logits[:, index], sampling, positions + index, DRAFT_STREAM, tokens
            )
            tokens.append(token)
            if token_probs is not None:
                probs.append(token_probs)
        return torch.stack(tokens, dim=1), torch.stack(probs, dim=1) if probs else None

    def _step(self, slots: Sequence[int], feed: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
        """One draft step over every row; a row whose padded feed would run past the draft's context (only near
        the end of a long sequence, where other rows are padded wider than it needs) steps on its own, fed only
        what it needs, and its logits are padded back to the batch's width."""
        limit, width = self.runner.max_length, feed.shape[1]
        tight = [index for index, start in enumerate(starts) if start + width > limit]
        if not tight:
            return self.runner.step(slots, feed)
        loose = [index for index in range(len(slots)) if index not in tight]
        groups = [(loose, width)] if loose else []
        groups += [([index], limit - starts[index]) for index in tight]
        pieces = [(rows, self.runner.step([slots[i] for i in rows], feed[rows, :fits])) for rows, fits in groups]
        first = pieces[0][1]
        logits = first.new_zeros(len(slots), width, first.shape[-1])
        for rows, piece in pieces:
            logits[rows, : piece.shape[1]] = piece
        return logits

    def rollback(self, slot: int, committed_length: int) -> None:
        self.runner.rollback(slot, committed_length)
