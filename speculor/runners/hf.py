"""A runner for any Hugging Face causal LM, on transformers' own dynamic caches, with exact rollback for each kind of
cache layer transformers builds.

This is the path that works for every architecture transformers knows; it pays the eager-mode Python overhead on
each forward, which the static-cache fast runner removes for the Llama family.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, cache_utils
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
)

from speculor.errors import SpeculorError
from speculor.runners.base import FeatureSink

# transformers renamed `past_key_values` to `cache` during 5.x, and recurrent models called it `cache_params`.
CACHE_ARGUMENTS = ("cache", "past_key_values", "cache_params")
# Attributes of a cache layer that hold attention keys and values: cropped, never copied into a checkpoint.
KV_ATTRIBUTES = ("keys", "values")

# The cache layer kinds whose rollback is known to be exact, by exact class: a model's own subclass (DeepSeek-V4's
# compressed attention, ...) carries state these rules do not cover, so it is refused. Cropped layers: plain
# attention, attention with indexer keys (cropped alike) and the placeholder of layers that cache nothing (the last
# two are missing from older transformers releases).
CROPPED_LAYERS = tuple(
    kind
    for kind in (getattr(cache_utils, name, None) for name in ("DynamicLayer", "DynamicIndexedLayer", "DummyLayer"))
    if kind is not None
)
RECURRENT_LAYERS = (LinearAttentionLayer, LinearAttentionAndFullAttentionLayer)
# Sliding-window kinds and the kind that keeps every position instead (see HFRunner).
FULL_COUNTERPARTS = {
    DynamicSlidingWindowLayer: DynamicLayer,
    LinearAttentionAndSlidingWindowAttentionLayer: LinearAttentionAndFullAttentionLayer,
}

# A recurrent model extends a non-empty state by up to this many tokens one forward each; a longer chunk (a prompt
# prefilled in pieces) rebuilds the state with one forward over the whole sequence, which costs less than hundreds
# of one-token forwards, each paying the eager-mode overhead.
ONE_TOKEN_EXTEND_LIMIT = 32

RecurrentCheckpoint = list[tuple[int, dict[str, Any]]]


def _context_length(model: PreTrainedModel) -> int:
    """The longest sequence the model's config allows, under the names architectures use for it."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 31


def _bidirectional_attention(model: PreTrainedModel) -> str | None:
    """The class of the first attention module of the language model that is not causal, if any (a vision tower's
    attention over image features is bidirectional by design and does not count)."""
    for path, module in model.named_modules():
        if getattr(module, "is_causal", True) is False and "vision" not in path.lower():
            return type(module).__name__
    return None


def _copy_state(value: Any) -> Any:
    """A copy of a cache layer attribute that later in-place updates of the layer cannot reach."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {key: _copy_state(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_state(item) for item in value]
    return value


def _module_state(model: PreTrainedModel) -> dict[str, Any]:
    """What the model's modules hold besides their parameters and submodules: buffers and plain attributes that are
    tensors, numbers or None, by dotted path, tensors copied. Decoding state kept there (RecurrentGemma's convolution
    and recurrent states) lies outside the cache a rollback restores."""
    state = {}
    for path, module in model.named_modules():
        held = {**module._buffers, **{name: value for name, value in vars(module).items() if not name.startswith("_")}}
        for name, value in held.items():
            if value is None or isinstance(value, (torch.Tensor, int, float)):
                state[f"{path}.{name}" if path else name] = _copy_state(value)
    return state


def _same_state(before: Any, after: Any) -> bool:
    if isinstance(before, torch.Tensor) or isinstance(after, torch.Tensor):
        return (
            isinstance(before, torch.Tensor)
            and isinstance(after, torch.Tensor)
            and before.shape == after.shape
            and before.dtype == after.dtype
            and torch.equal(before, after)
        )
    return type(before) is type(after) and before == after


@dataclass
class _Slot:
    """One sequence: its cache, how many tokens it holds and, for recurrent models, what rollback needs."""

    cache: DynamicCache | None = None
    length: int = 0
    # Recurrent models only: the recurrent state just before each token of the steps since the last rollback, by
    # length...
    checkpoints: dict[int, RecurrentCheckpoint] = field(default_factory=dict)
    # ...and every token fed since the slot was reset, to rebuild the state when a rollback goes further back.
    history: list[torch.Tensor] = field(default_factory=list)


# Encoders whose causal-LM heads attend both ways unless the config sets is_decoder=True, with no `is_causal` flag on
# their attention modules to detect it by.
ENCODER_MODEL_TYPES = ("megatron-bert", "rembert")
# Model types a sweep of every causal LM transformers builds offline found wrong or broken under incremental decoding
# (tests/test_architectures.py covers the ones that work), refused with what was found.
INEXACT_MODEL_TYPES = {
    **dict.fromkeys(ENCODER_MODEL_TYPES, "is a bidirectional encoder unless its config sets is_decoder=True"),
    "moshi": "applies its sliding window only by dropping old cache entries, not in its attention mask (its output "
    "depends on how many tokens each forward feeds)",
    "dory": "adds cache layers of its own that fail in incremental decoding",
    "cpmant": "returns no logits for incremental decoding steps",
}


class HFRunner:
    """Wraps a `PreTrainedModel` in eval mode, with one transformers `DynamicCache` (batch size 1) per slot.

    A step runs its rows one after another: rows of one transformers cache share a single length and cannot be cut
    back independently, so each slot keeps a cache of its own. Rollback is exact for every cache layer kind:

    - Full attention: the keys and values are cropped.
    - Sliding-window and chunked attention (Mistral/Qwen2 with a window in use, Gemma 2/3, Starcoder2, ...):
      transformers' sliding layers drop positions that leave the window and then cannot be cropped, so every layer
      here keeps all positions (`DynamicLayer`) and the model's own mask still applies the window. Exact, at the price
      of memory growing with the sequence instead of the window.
    - Recurrent state (Mamba-style linear-attention layers, alone or in hybrids): a state cannot be cropped, and a
      multi-token forward over an existing state is not exact in every architecture (Mamba's scan restarts from a
      zero state), so after the prefill tokens go in one forward each and the recurrent state is copied before each
      one of a step. Rollback restores the copy taken at the wanted length (and crops any attention layers); going
      back past the last rollback, which speculative decoding never does, re-feeds the sequence from its start. A
      verify of γ + 1 tokens therefore costs γ + 1 forwards here: exact, but speculation rarely pays on such models.

    Models that take no cache argument, or whose cache layers are of a kind not listed above, are refused at
    construction, before anything is generated.

    Target features (`capture_features`) come from transformers' own `output_hidden_states`, asked for only once a
    feature draft is attached.
    """

    def __init__(self, model: PreTrainedModel, slots: int = 1) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise SpeculorError(f"slots must be an integer ≥ 1, got {slots!r}")
        self.model = model.eval()
        # transformers' own list of models whose decoding state lives outside its standard cache (MiniMax's lightning
        # attention, RWKV, xLSTM, ...): nothing speculor can crop or checkpoint.
        supports_dynamic_cache = getattr(model, "_supports_default_dynamic_cache", lambda: True)
        if not supports_dynamic_cache():
            raise SpeculorError(
                f"{type(model).__name__} keeps its decoding state in a cache of its own rather than a transformers "
                "DynamicCache, so speculor cannot roll it back exactly after a rejected draft"
            )
        model_type = getattr(model.config, "model_type", None)
        if model_type in INEXACT_MODEL_TYPES and not (
            model_type in ENCODER_MODEL_TYPES and getattr(model.config, "is_decoder", False)
        ):
            raise SpeculorError(
                f"{type(model).__name__} {INEXACT_MODEL_TYPES[model_type]}, so speculative decoding could not "
                "reproduce its output"
            )
        bidirectional = _bidirectional_attention(model)
        if bidirectional is not None:
            raise SpeculorError(
                f"{type(model).__name__} attends to later tokens too ({bidirectional}.is_causal is False: an encoder "
                "loaded as a language model without is_decoder=True), so a forward over several drafted tokens "
                "cannot reproduce its own decoding"
            )
        parameters = inspect.signature(model.forward).parameters
        argument = next((name for name in CACHE_ARGUMENTS if name in parameters), None)
        if argument is None:
            raise SpeculorError(
                f"{type(model).__name__} takes no KV cache argument ({', '.join(CACHE_ARGUMENTS)}), so it cannot "
                "decode incrementally; speculor's Hugging Face runner needs a transformers Cache"
            )
        self._cache_argument = argument
        self._takes_position_ids = "position_ids" in parameters
        self._takes_logits_to_keep = "logits_to_keep" in parameters
        self._recurrent = any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in self._new_cache().layers)
        output_embeddings = model.get_output_embeddings()
        weight = getattr(output_embeddings, "weight", None)
        self._vocab_size = (
            int(weight.shape[0]) if weight is not None else int(model.config.get_text_config().vocab_size)
        )
        self._max_length = _context_length(model)
        self._slots = [_Slot() for _ in range(slots)]
        self._feature_layers: tuple[int, ...] | None = None
        self._feature_sink: FeatureSink | None = None
        # What the forwards of the current call captured, in order, until handed to the sink.
        self._captured: list[torch.Tensor] = []
        self._refuse_state_outside_the_cache()

    @torch.inference_mode()
    def _refuse_state_outside_the_cache(self) -> None:
        """Decode two different three-token sequences (a two-token prefill, then one token), each in a fresh cache,
        and refuse the model if anything its modules hold differs between the two: such state follows the last
        forward rather than the cache, so no rollback can restore it. The first sequence also lets modules build
        what they cache lazily (rotary tables, masks), which then matches across the two. Four forwards of a token
        or two, once, at load."""

        def decode(tokens: list[int]) -> None:
            probe = _Slot()
            for chunk in (tokens[:2], tokens[2:]):
                self._feed(probe, torch.tensor(chunk, device=self.device), logits_to_keep=1, checkpoints=False)

        decode([0, 1, 2])
        before = _module_state(self.model)
        decode([2, 0, 1])
        after = _module_state(self.model)
        changed = sorted(
            path for path in before.keys() | after.keys() if not _same_state(before.get(path), after.get(path))
        )
        if changed:
            raise SpeculorError(
                f"{type(self.model).__name__} keeps decoding state on its own modules ({changed[0]} follows every "
                "forward), outside the cache speculor rolls back, so it cannot be restored after a rejected draft"
            )

    def _new_cache(self) -> DynamicCache:
        """A cache laid out as transformers would build it for this model, with every sliding-window layer replaced
        by one that keeps all positions (see the class docstring); refuses layer kinds it cannot roll back."""
        cache = DynamicCache(config=self.model.config)
        for index, layer in enumerate(cache.layers):
            kind = type(layer)
            if kind in FULL_COUNTERPARTS:
                full = FULL_COUNTERPARTS[kind]
                recurrent = issubclass(full, LinearAttentionCacheLayerMixin)
                cache.layers[index] = full(number_of_states=layer.number_of_states) if recurrent else full()
            elif kind not in CROPPED_LAYERS + RECURRENT_LAYERS:
                raise SpeculorError(
                    f"{type(self.model).__name__} uses cache layers of kind {kind.__name__}, which speculor "
                    "cannot roll back exactly after a rejected draft"
                )
        return cache

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
    def slots(self) -> int:
        return len(self._slots)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def layer_count(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    def capture_features(self, layers: Sequence[int], sink: FeatureSink) -> None:
        wrong = [layer for layer in layers if not 0 <= layer < self.layer_count]
        if wrong or not layers:
            raise SpeculorError(f"feature layers must be among 0..{self.layer_count - 1}, got {list(layers)}")
        self._feature_layers = tuple(layers)
        self._feature_sink = sink

    def _hand_over_features(self, slot: int, start: int) -> None:
        """Give the sink what this call's forwards captured for `slot` (positions from `start` on), as one row."""
        captured, self._captured = self._captured, []
        if self._feature_sink is not None and captured:
            self._feature_sink([slot], [start], torch.cat(captured)[None])

    def _slot(self, slot: int) -> _Slot:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(self._slots):
            raise SpeculorError(f"slot {slot!r} does not exist: this runner holds slots 0..{len(self._slots) - 1}")
        return self._slots[slot]

    def length(self, slot: int) -> int:
        return self._slot(slot).length

    def reset(self, slot: int) -> None:
        self._slot(slot)
        self._slots[slot] = _Slot()

    @torch.inference_mode()
    def extend(self, slot: int, token_ids: torch.Tensor) -> None:
        state = self._slot(slot)
        if not token_ids.numel():
            return
        if self._recurrent and state.length and token_ids.numel() > ONE_TOKEN_EXTEND_LIMIT:
            # A long chunk after a recurrent state (a prompt prefilled in chunks): one fresh prefill of the whole
            # sequence instead of a forward per token.
            self._rebuild(slot, torch.cat([*state.history, token_ids.view(-1)]))
            self._hand_over_features(slot, 0)
            return
        start = state.length
        self._feed(state, token_ids.view(-1), logits_to_keep=1, checkpoints=False)
        self._hand_over_features(slot, start)

    def extend_rows(self, slots: Sequence[int], token_ids: Sequence[torch.Tensor]) -> None:
        """One row after another, as `step` runs them."""
        for slot, row in zip(slots, token_ids, strict=True):
            self.extend(slot, row)

    @torch.inference_mode()
    def step(self, slots: Sequence[int], token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.dim() != 2 or token_ids.shape[0] != len(slots) or token_ids.shape[1] < 1:
            raise SpeculorError(
                f"step needs token ids of shape (rows, k ≥ 1) with one row per slot; got {tuple(token_ids.shape)} "
                f"for {len(slots)} slots"
            )
        if len(set(slots)) != len(slots):
            raise SpeculorError(f"step lists a slot twice: {list(slots)}")
        width = token_ids.shape[1]
        rows = []
        for slot, row in zip(slots, token_ids, strict=True):
            state = self._slot(slot)
            start = state.length
            rows.append(self._feed(state, row, width))
            self._hand_over_features(slot, start)
        return torch.stack(rows)

    @torch.inference_mode()
    def rollback(self, slot: int, length: int) -> None:
        state = self._slot(slot)
        surplus = state.length - length
        if surplus > 0 and self._recurrent and length not in state.checkpoints:
            self._rebuild(slot, torch.cat(state.history)[:length])
            # Positions a rollback re-feeds were handed over when first fed, with the same values.
            self._captured = []
            return
        if surplus > 0:
            for layer in state.cache.layers:
                if not isinstance(layer, LinearAttentionCacheLayerMixin):
                    layer.crop(-surplus)
                elif isinstance(layer, DynamicLayer):
                    # A hybrid layer: crop only its attention part; the checkpoint below restores the recurrent one.
                    DynamicLayer.crop(layer, -surplus)
            for index, saved in state.checkpoints.get(length, ()):
                state.cache.layers[index].__dict__.update(saved)
            state.length = length
            if self._recurrent:
                state.history = [torch.cat(state.history)[:length]]
        state.checkpoints.clear()

    def _rebuild(self, slot: int, sequence: torch.Tensor) -> None:
        """Replace a recurrent slot by a fresh one holding `sequence`, prefilled in one forward (exact: the state
        starts from zero, as the model's own prefill expects)."""
        self.reset(slot)
        if sequence.numel():
            self._feed(self._slots[slot], sequence, logits_to_keep=1, checkpoints=False)

    def _feed(
        self, state: _Slot, token_ids: torch.Tensor, logits_to_keep: int, checkpoints: bool = True
    ) -> torch.Tensor:
        """Append `token_ids` (1-D) to the slot's cache; returns the float logits of its last `logits_to_keep`.
        With `checkpoints`, a recurrent model's state is copied before each token, so rollback can return there."""
        if state.cache is None:
            state.cache = self._new_cache()
        if not self._recurrent:
            return self._run(state, token_ids, logits_to_keep)
        state.history.append(token_ids)
        if state.length == 0:
            # A fresh state: the model's own prefill path is exact over many tokens.
            return self._run(state, token_ids, logits_to_keep)
        rows = []
        for position in range(token_ids.numel()):
            if checkpoints:
                state.checkpoints[state.length] = self._recurrent_checkpoint(state.cache)
            rows.append(self._run(state, token_ids[position : position + 1], 1))
        return torch.cat(rows)[-logits_to_keep:]

    @staticmethod
    def _recurrent_checkpoint(cache: DynamicCache) -> RecurrentCheckpoint:
        """Copies of every recurrent layer's state (everything but attention keys and values), by layer index."""
        return [
            (index, {name: _copy_state(value) for name, value in vars(layer).items() if name not in KV_ATTRIBUTES})
            for index, layer in enumerate(cache.layers)
            if isinstance(layer, LinearAttentionCacheLayerMixin)
        ]

    def _run(self, state: _Slot, token_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        count = token_ids.numel()
        options: dict[str, Any] = {self._cache_argument: state.cache, "use_cache": True}
        if self._takes_position_ids:
            positions = torch.arange(state.length, state.length + count, device=token_ids.device)
            options["position_ids"] = positions.view(1, -1)
        if self._takes_logits_to_keep:
            options["logits_to_keep"] = logits_to_keep
        if self._feature_layers is not None:
            options["output_hidden_states"] = True
        output = self.model(input_ids=token_ids.view(1, -1), **options)
        if self._feature_layers is not None:
            self._captured.append(torch.cat([output.hidden_states[layer][0] for layer in self._feature_layers], -1))
        state.length += count
        return output.logits[0, -logits_to_keep:].float()
