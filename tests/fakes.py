"""A cheap stand-in model behind the Runner protocol, for tests that need thousands of generations.

Its logits depend on the whole cached context (through a hash), so any cache or rollback mistake in the engine
changes the distribution it produces and shows up in the tests.
"""

from __future__ import annotations

import torch


class TableRunner:
    """Logits looked up from a random table indexed by a hash of every token seen so far, one token list per slot."""

    def __init__(
        self, vocab_size: int, seed: int, sharpness: float = 1.5, max_length: int = 64, slots: int = 1
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(997, vocab_size, generator=generator, dtype=torch.float64) * sharpness
        self.sequences: list[list[int]] = [[] for _ in range(slots)]
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
    def slots(self) -> int:
        return len(self.sequences)

    def length(self, slot: int) -> int:
        return len(self.sequences[slot])

    def reset(self, slot: int) -> None:
        self.sequences[slot] = []

    def extend(self, slot: int, token_ids: torch.Tensor) -> None:
        self.sequences[slot].extend(token_ids.tolist())

    def extend_rows(self, slots, token_ids) -> None:
        for slot, row in zip(slots, token_ids, strict=True):
            self.extend(slot, row)

    def step(self, slots, token_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for slot, tokens in zip(slots, token_ids.tolist(), strict=True):
            sequence = self.sequences[slot]
            logits = []
            for token in tokens:
                sequence.append(token)
                logits.append(self.logits_after(sequence))
            rows.append(torch.stack(logits))
        return torch.stack(rows)

    def logits_after(self, context: list[int]) -> torch.Tensor:
        return self.table[hash(tuple(context)) % self.table.shape[0]]

    def rollback(self, slot: int, length: int) -> None:
        del self.sequences[slot][length:]
