"""The runner protocol: one model together with the KV caches of several sequences (rows).

The engine never touches a model directly. A runner holds `slots` sequences at once, each with its own cache
length. The engine appends tokens to a slot's cache without logits (`extend`, for a prompt or a chunk of one), runs
steps that feed every listed slot the same number of tokens at that slot's own positions and return their logits
(`step`), and cuts a slot back after a rejection (`rollback`). A dynamic-cache runner crops tensors; a static-cache
runner only moves a per-slot position pointer and keeps fixed shapes for graph capture, so both fit behind this
protocol. A runner that cannot batch may run a step's rows one after another; the engine cannot tell.

A runner may also offer target features (`FeatureSource`), an optional capability for drafts that read the target's
own hidden states (EAGLE-3 heads, `speculor.eagle`): asked once, it hands the residual stream entering a few of its
layers at every position it processes to a sink. The engine never sees this; a runner nobody asked captures nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


# Called after every forward that fed tokens: `(slots, starts, features)`, where row i's tokens were written to
# `slots[i]` from position `starts[i]` on and `features` is (rows, width, len(layers) · hidden_size), float, one
# vector per fed position (rows padded to the widest are padded here too: positions past what a row really fed hold
# padding's features, which the sink must not trust). `features` may be a view of a buffer the next forward
# overwrites: a sink that keeps it copies it.
FeatureSink = Callable[[Sequence[int], Sequence[int], torch.Tensor], None]


@runtime_checkable
class FeatureSource(Protocol):
    """The optional capability of a runner that can capture its model's hidden states for a feature draft."""

    @property
    def hidden_size(self) -> int:
        """Width of one layer's hidden state."""
        ...

    @property
    def layer_count(self) -> int:
        """Decoder layers of the model."""
        ...

    def capture_features(self, layers: Sequence[int], sink: FeatureSink) -> None:
        """From now on, after every `extend`, `extend_rows` and `step`, hand `sink` the hidden states entering
        decoder layers `layers` (index i is the residual stream after i layers: Hugging Face's
        `output_hidden_states[i]`), concatenated in that order, at every position fed. Called once, before the
        runner's step shapes are prepared (a graph captured before would not write them)."""
        ...
