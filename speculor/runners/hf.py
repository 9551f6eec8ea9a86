"""A runner for any Hugging Face causal LM, built on its own `DynamicCache`.

This is the path that works for every architecture transformers knows; it pays the eager-mode Python overhead on
each forward, which the static-cache fast runner removes for the Llama family.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel


def _context_length(model: PreTrainedModel) -> int:
    """The longest sequence the model's config allows, under the names architectures use for it."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 31


class HFRunner:
    """Wraps a `PreTrainedModel` in eval mode; the cache is a transformers `DynamicCache` cropped on rollback."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self._cache: DynamicCache | None = None
        self._length = 0
        self._vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._max_length = _context_length(model)
        # transformers renamed `past_key_values` to `cache` during 5.x; pass whichever this version's model takes.
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def cache_length(self) -> int:
        return self._length

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor) -> None:
        self._cache = DynamicCache(config=self.model.config)
        self._length = 0
        if token_ids.numel():
            self._run(token_ids, logits_to_keep=1)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            self.prefill(token_ids[:0])
        return self._run(token_ids, logits_to_keep=token_ids.numel())

    def truncate(self, length: int) -> None:
        surplus = self._length - length
        if surplus > 0 and self._cache is not None:
            # A negative argument means "remove this many" in every transformers 5.x release.
            self._cache.crop(-surplus)
            self._length = length

    def _run(self, token_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        count = token_ids.numel()
        positions = torch.arange(self._length, self._length + count, device=token_ids.device)
        output = self.model(
            input_ids=token_ids.view(1, -1),
            **{self._cache_argument: self._cache},
            use_cache=True,
            position_ids=positions.view(1, -1),
            logits_to_keep=logits_to_keep,
        )
        self._length += count
        return output.logits[0]
