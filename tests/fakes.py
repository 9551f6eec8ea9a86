"""A cheap stand-in model behind the Runner protocol, for tests that need thousands of generations.

Its logits depend on the whole cached context (through a hash), so any cache or rollback mistake in the engine
changes the distribution it produces and shows up in the tests.
"""

from __future__ import annotations

import torch


class TableRunner:
    """Logits looked up from a random table indexed by a hash of every token seen so far."""

    def __init__(self, vocab_size: int, seed: int, sharpness: float = 1.5, max_length: int = 64) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(997, vocab_size, generator=generator, dtype=torch.float64) * sharpness
        self.tokens: list[int] = []
        self._vocab_size = vocab_size
        self._max_length = max_length

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def cache_length(self) -> int:
        return len(self.tokens)

    def prefill(self, token_ids: torch.Tensor) -> None:
        self.tokens = token_ids.tolist()

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for token in token_ids.tolist():
            self.tokens.append(token)
            rows.append(self.logits_after(self.tokens))
        return torch.stack(rows)

    def logits_after(self, context: list[int]) -> torch.Tensor:
        return self.table[hash(tuple(context)) % self.table.shape[0]]

    def truncate(self, length: int) -> None:
        del self.tokens[length:]
