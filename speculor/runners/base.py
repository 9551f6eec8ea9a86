"""The runner protocol: one model together with its key/value cache.

The engine never touches a model directly. It asks a runner to append tokens to the cache (returning logits for
them) and to cut the cache back after a rejection. A dynamic-cache runner crops tensors; a static-cache runner
only moves a position pointer, and can keep fixed shapes for graph capture, so both fit behind this protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Runner(Protocol):
    """A causal language model with a KV cache, fed one sequence (batch size 1)."""

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
        """Most positions the model can attend over (prompt plus generated tokens)."""
        ...

    @property
    def cache_length(self) -> int:
        """How many tokens the cache currently holds."""
        ...

    def prefill(self, token_ids: torch.Tensor) -> None:
        """Empty the cache, then fill it with `token_ids` (1-D, may be empty). No logits are returned."""
        ...

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append `token_ids` (1-D, k ≥ 1) to the cache and return their logits, shape (k, vocab_size)."""
        ...

    def truncate(self, length: int) -> None:
        """Cut the cache back to its first `length` tokens (no-op when it holds fewer)."""
        ...
