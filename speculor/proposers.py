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
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for index in range(gamma):
            at = positions + index if sampling.any_sampled else positions
            token, token_probs = sample_rows(last[:, : self.vocab_size], sampling, at, DRAFT_STREAM)
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
            caught_up=bool(catching_up),
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
