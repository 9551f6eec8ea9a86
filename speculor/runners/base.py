"""The runner protocol: one model together with the KV caches of several sequences (rows).

The engine never touches a model directly. A runner holds `slots` sequences at once, each with its own cache
length. The engine appends tokens to a slot's cache without logits (`extend`, for a prompt or a chunk of one), runs
steps that feed every listed slot the same number of tokens at that slot's own positions and return their logits
(`step`), and cuts a slot back after a rejection (`rollback`). A dynamic-cache runner crops tensors; a static-cache
runner only moves a per-slot position pointer and keeps fixed shapes for graph capture, so both fit behind this
protocol. A runner that cannot batch may run a step's rows one after another; the engine cannot tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Runner(Protocol):
    """A causal language model with one KV cache per slot, slots numbered 0..slots-1."""

    @property
    def device(self) -> torch.device:
        """Where token ids must live and where logits come back."""
        ...

    @property
    def vocab_size(self) -> int:
        """Width of the logits this runner returns."""
        ...

    @property
    def max_length(self) -> int:
        """Most positions one sequence can attend over (prompt plus generated tokens)."""
        ...

    @property
    def slots(self) -> int:
        """How many sequences the runner can hold at once."""
        ...

    def length(self, slot: int) -> int:
        """How many tokens the slot's cache currently holds."""
        ...

    def reset(self, slot: int) -> None:
        """Empty the slot's cache (a new sequence starts there)."""
        ...

    def extend(self, slot: int, token_ids: torch.Tensor) -> None:
        """Append `token_ids` (1-D, may be empty) to the slot's cache without computing logits: a prompt, or one
        chunk of it."""
        ...

    def extend_rows(self, slots: Sequence[int], token_ids: Sequence[torch.Tensor]) -> None:
        """`extend` for several slots at once (`token_ids[i]` to `slots[i]`, lengths may differ): prompts joining
        together, prefilled in one forward where the runner can, so the weights are read once, not once per row."""
        ...

    def step(self, slots: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        """Append `token_ids[i]` to the cache of `slots[i]` for every row i and return their float logits, shape
        (rows, k, vocab_size), a tensor the caller owns. `token_ids` is (rows, k), k ≥ 1, the same k for every row;
        a row's tokens go at that slot's own positions. Each listed slot's length grows by k."""
        ...

    def rollback(self, slot: int, length: int) -> None:
        """Cut the slot's cache back to its first `length` tokens (no-op when it holds fewer)."""
        ...
