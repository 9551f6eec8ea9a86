"""Proposers: where drafted tokens come from, behind one small protocol.

A proposer sees the committed context (prompt plus everything emitted, the last token not yet fed to any model)
and returns up to γ tokens together with the exact distribution q each was drawn from. After verification the
engine tells it how much of the context survives (`rollback`), so it can resync its own state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from speculor.runners.base import Runner
from speculor.sampling import SamplingParams, sample_from_logits


@dataclass
class Proposal:
    """`tokens` (n,) on the target's device; `probs` (n, V) the q each token was sampled from, or None when q is
    one-hot at each token (greedy drafting or a deterministic lookup); `forwards` counts draft-model calls."""

    tokens: torch.Tensor
    probs: torch.Tensor | None
    forwards: int


class Proposer(Protocol):
    def start(self, context: list[int]) -> None:
        """Begin a new sequence whose committed context is `context` (the prompt)."""
        ...

    def propose(
        self,
        context: list[int],
        gamma: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        confidence_threshold: float | None = None,
    ) -> Proposal:
        """Draft up to `gamma` tokens continuing `context`. With `confidence_threshold`, stop early after a token
        whose draft probability falls below it (Hugging Face's `assistant_confidence_threshold`)."""
        ...

    def rollback(self, committed_length: int) -> None:
        """Only the first `committed_length` tokens of the context the proposer last saw are still valid."""
        ...


class DraftModelProposer:
    """A small causal LM drafting autoregressively with its own KV cache.

    The cache holds every committed token except the newest; when all γ drafts were accepted the draft never saw
    x_γ, so the next proposal feeds the two missing tokens in one forward instead of one.
    """

    def __init__(self, runner: Runner, vocab_size: int) -> None:
        self.runner = runner
        self.vocab_size = vocab_size

    def start(self, context: list[int]) -> None:
        self.runner.prefill(torch.tensor(context[:-1], dtype=torch.long, device=self.runner.device))

    def propose(
        self,
        context: list[int],
        gamma: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        confidence_threshold: float | None = None,
    ) -> Proposal:
        device = self.runner.device
        feed = torch.tensor(context[self.runner.cache_length :], dtype=torch.long, device=device)
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for _ in range(gamma):
            logits = self.runner.forward(feed)[-1, : self.vocab_size]
            token, token_probs = sample_from_logits(logits, params, generator)
            tokens.append(token)
            if token_probs is not None:
                probs.append(token_probs)
            feed = token.view(1)
            if confidence_threshold is not None and len(tokens) < gamma:
                chosen = token_probs[token] if token_probs is not None else logits.float().softmax(-1).max()
                if float(chosen) < confidence_threshold:
                    break
        return Proposal(
            tokens=torch.stack(tokens) if tokens else torch.empty(0, dtype=torch.long, device=device),
            probs=torch.stack(probs) if probs else None,
            forwards=len(tokens),
        )

    def rollback(self, committed_length: int) -> None:
        self.runner.truncate(committed_length)


class PromptLookupProposer:
    """Draft-free speculation: find the latest earlier occurrence of the context's last n tokens (n from
    `max_ngram` down to 1) and propose the tokens that followed it, as Hugging Face's prompt lookup does.
    The proposal is deterministic, so q is one-hot at each proposed token."""

    def __init__(self, max_ngram: int, device: torch.device) -> None:
        if max_ngram < 1:
            raise ValueError(f"ngram size must be ≥ 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.device = device

    def start(self, context: list[int]) -> None:
        """Nothing to prepare: the lookup reads the context afresh each step."""

    def propose(
        self,
        context: list[int],
        gamma: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        confidence_threshold: float | None = None,
    ) -> Proposal:
        continuation = find_continuation(np.asarray(context, dtype=np.int64), self.max_ngram, gamma)
        tokens = torch.tensor(continuation, dtype=torch.long, device=self.device)
        return Proposal(tokens=tokens, probs=None, forwards=0)

    def rollback(self, committed_length: int) -> None:
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
