"""EAGLE-3 heads (Li et al., arXiv 2503.01840): a one-layer draft that reads the target's own hidden states.

The head's input at position i is the target's hidden states entering three of its layers (low, middle, high) at i,
concatenated and projected by `fc` (3·H_target → H), together with the embedding of the token at i + 1; one decoder
layer whose attention reads both (q/k/v take 2H: the normed embedding next to the normed projection), a final norm
and `lm_head` over a draft vocabulary that may be smaller than the target's. So it predicts the token at i + 2 from
what the target computed at i and the token the target then chose. Its later drafting steps feed the head's own
output (before the final norm) where the target's projected features were.

The checkpoint layout is the one vLLM and SGLang load (`LlamaForCausalLMEagle3`): `fc.weight`, `midlayer.{
input_layernorm, hidden_norm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}`,
`norm.weight`, `lm_head.weight` (draft vocab × H), `d2t` (int64, target id = draft id + d2t[draft id]), `t2d` (bool
over the target vocabulary) and optionally `embed_tokens.weight` (else the target's embeddings are used). Which
target layers feed it comes from the config's `eagle_config.eagle_aux_hidden_state_layer_ids`, else the peers'
default (2, L/2, L − 3), counted as vLLM counts them: the residual stream entering those layers (Hugging Face's
`output_hidden_states[i]`, i.e. SpecForge's outputs of layers 1, L/2 − 1, L − 4).

`Eagle3Proposer` drafts a chain of γ tokens, not a tree: the engine verifies one sequence per row (its verifier,
ragged acceptance, KV rollback and the load-aware γ are built around one chain), and a tree pays off mainly at
batch 1 while costing from batch ~16 (ARCHITECTURE.md); a chain keeps the exact acceptance rule unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from speculor.errors import SpeculorError
from speculor.proposers import Proposal
from speculor.runners.base import FeatureSource, Runner
from speculor.runners.llama import STATIC_ROPE_TYPES, rotary_kinds, rotary_tables
from speculor.sampling import DRAFT_STREAM, RowSampling, sample_rows

# The architecture names vLLM's and SGLang's registries map to their EAGLE-3 Llama head.
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
WEIGHTS_FILE = "model.safetensors"


def default_feature_layers(layer_count: int) -> tuple[int, int, int]:
    """The target layers whose incoming hidden states feed a head whose checkpoint names none: vLLM's and SGLang's
    (2, L // 2, L − 3), clamped into range for very shallow targets."""
    return tuple(min(max(layer, 0), layer_count - 1) for layer in (2, layer_count // 2, layer_count - 3))


def is_eagle3_checkpoint(source: object) -> bool:
    """Whether `source` is a directory holding an EAGLE-3 head (its config names an EAGLE-3 architecture)."""
    if not isinstance(source, (str, os.PathLike)) or not os.path.isfile(os.path.join(source, "config.json")):
        return False
    try:
        config = json.loads(Path(source, "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(name in EAGLE3_ARCHITECTURES for name in config.get("architectures") or [])


@dataclass(frozen=True)
class Eagle3Config:
    """The shapes of a head, read from (and written to) a hub config.json. `vocab_size` is the target's vocabulary,
    `draft_vocab_size` the head's own; `target_hidden_size` the width of each of the target's feature vectors;
    `feature_layers` None means the peers' default for the target it is loaded with."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    max_position_embeddings: int
    feature_layers: tuple[int, ...] | None = None
    rope: dict | None = None
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, config: dict) -> Eagle3Config:
        layers = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        if int(config.get("num_hidden_layers", 1)) != 1:
            raise SpeculorError(
                f"the EAGLE-3 head has {config['num_hidden_layers']} decoder layers; speculor loads one-layer heads"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise SpeculorError(f"the EAGLE-3 head's activation {config['hidden_act']!r} is not silu")
        rope = {key: config[key] for key in ("rope_theta", "rope_scaling", "rope_parameters") if key in config}
        return cls(
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads", heads)),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            vocab_size=int(config["vocab_size"]),
            draft_vocab_size=int(config.get("draft_vocab_size") or config["vocab_size"]),
            target_hidden_size=int(config.get("target_hidden_size") or hidden),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            feature_layers=tuple(int(layer) for layer in layers) if layers else None,
            rope=rope or None,
        )

    def to_dict(self, dtype: torch.dtype) -> dict:
        """The hub config.json: what vLLM's and SGLang's EAGLE-3 loaders read."""
        config = {
            "architectures": [EAGLE3_ARCHITECTURES[0]],
            "model_type": "llama",
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
            **(self.rope or {"rope_theta": 10000.0}),
        }
        if self.feature_layers is not None:
            config["eagle_config"] = {
                "eagle_aux_hidden_state_layer_ids": list(self.feature_layers),
                "use_aux_hidden_state": True,
            }
        return config

    def rotary(self) -> tuple[torch.Tensor, float]:
        """(inverse frequencies, attention scaling) of the head's rotary embedding, as transformers computes them
        for a Llama with this config's rope settings; only rope types fixed at load time are accepted."""
        llama = LlamaConfig(
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            **(self.rope or {}),
        )
        ((inv_freq, scaling, rope_type),) = rotary_kinds(LlamaRotaryEmbedding(llama)).values()
        if rope_type not in STATIC_ROPE_TYPES:
            raise SpeculorError(f"the EAGLE-3 head's rope type {rope_type!r} is not one of {STATIC_ROPE_TYPES}")
        return inv_freq, scaling


class _Attention(nn.Module):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(2 * hidden, config.num_attention_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, config.num_key_value_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, config.num_key_value_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, hidden, bias=False)


class _MLP(nn.Module):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class _MidLayer(nn.Module):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.hidden_norm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.self_attn = _Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.mlp = _MLP(config)


def rotate(heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (..., heads, head_dim) with cos/sin (..., head_dim) broadcast over the heads, in the
    half-split layout Llama uses."""
    half = heads.shape[-1] // 2
    rotated = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
    return heads * cos[..., None, :] + rotated * sin[..., None, :]


class Eagle3Head(nn.Module):
    """The head's weights under the hub's names, and its forward pass in pieces that inference (with a KV cache,
    `Eagle3Proposer`) and training (unrolled over several steps, `speculor.train_eagle`) share: `fuse` projects
    target features, `queries_keys_values` and `finish` wrap whichever attention the caller runs, `logits` reads
    the draft vocabulary. `embed` is the token embedding: the checkpoint's own, or the target's when it has none
    (then it is not a parameter of the head and is never saved with it)."""

    def __init__(self, config: Eagle3Config, embed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(3 * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = _MidLayer(config)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
        self.embed_tokens: nn.Embedding | None = None
        # A plain tensor, not a parameter: the target's embeddings are neither trained nor saved with the head.
        self._target_embed = embed.detach() if embed is not None else None

    @property
    def embedding(self) -> torch.Tensor:
        if self.embed_tokens is not None:
            return self.embed_tokens.weight
        if self._target_embed is None:
            raise SpeculorError("the EAGLE-3 head has no embeddings of its own: load it with its target")
        return self._target_embed

    @property
    def draft_to_target(self) -> torch.Tensor:
        """The target id of every draft id (d2t holds offsets)."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def rotary_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0..length − 1, (length, head_dim), on the head's device and in its dtype
        (computed in float32 from the config, never from rounded frequencies)."""
        inv_freq, scaling = self.config.rotary()
        weight = self.lm_head.weight
        cos, sin = rotary_tables(inv_freq.to(weight.device), scaling, length, weight.dtype)
        return cos, sin

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """The target's concatenated features (..., 3·H_target) projected to the head's width."""
        return self.fc(features)

    def queries_keys_values(
        self, tokens: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (..., heads, head_dim), keys and values (..., kv_heads, head_dim) of positions whose
        next tokens are `tokens` (...) and whose hidden input is `hidden` (..., H: fused target features or the
        head's own previous output); cos/sin (..., head_dim) at their positions."""
        layer, config = self.midlayer, self.config
        embeds = F.embedding(tokens, self.embedding).to(hidden.dtype)
        joined = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        shape = joined.shape[:-1]
        attention = layer.self_attn
        query = attention.q_proj(joined).view(*shape, config.num_attention_heads, config.head_dim)
        key = attention.k_proj(joined).view(*shape, config.num_key_value_heads, config.head_dim)
        value = attention.v_proj(joined).view(*shape, config.num_key_value_heads, config.head_dim)
        return rotate(query, cos, sin), rotate(key, cos, sin), value

    def finish(self, attended: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output before the final norm (..., H), from the attention output (..., heads·head_dim) and
        the hidden input (the residual)."""
        layer = self.midlayer
        residual = layer.self_attn.o_proj(attended) + hidden
        normed = layer.post_attention_layernorm(residual)
        mlp = layer.mlp
        return mlp.down_proj(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed)) + residual

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits (..., draft_vocab) of the layer's output."""
        return self.lm_head(self.norm(output))

    def check_fits(self, target: PreTrainedModel) -> tuple[int, ...]:
        """Refuse a target this head was not made for, in one line saying what does not fit; returns the target
        layers whose incoming hidden states it reads."""
        config, text = self.config, target.config.get_text_config()
        target_hidden, layers = int(text.hidden_size), int(text.num_hidden_layers)
        target_vocab = int(target.get_input_embeddings().weight.shape[0])
        if config.target_hidden_size != target_hidden:
            raise SpeculorError(
                f"the EAGLE-3 head reads target hidden states of width {config.target_hidden_size}, but the target's "
                f"hidden size is {target_hidden}"
            )
        if config.vocab_size != target_vocab:
            raise SpeculorError(
                f"the EAGLE-3 head was made for a vocabulary of {config.vocab_size:,} tokens, but the target has "
                f"{target_vocab:,}"
            )
        if self.embed_tokens is None and config.hidden_size != target_hidden:
            raise SpeculorError(
                f"the EAGLE-3 head has no embeddings and its width {config.hidden_size} differs from the target's "
                f"{target_hidden}, so it cannot use the target's"
            )
        if int(self.draft_to_target.max()) >= target_vocab:
            raise SpeculorError("the EAGLE-3 head's d2t maps draft tokens past the target's vocabulary")
        chosen = config.feature_layers or default_feature_layers(layers)
        if len(chosen) != 3 or not all(0 <= layer < layers for layer in chosen):
            raise SpeculorError(
                f"the EAGLE-3 head reads target layers {list(chosen)}, but the target has {layers} layers"
            )
        return tuple(chosen)


def hub_rope_settings(config: object) -> dict:
    """A target config's rotary settings the way EAGLE-3 hub configs spell them (`rope_theta`, plus `rope_scaling`
    for a scaled rope), which vLLM and SGLang read and transformers converts: transformers 5 keeps them in one
    `rope_parameters` dict instead."""
    parameters = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = parameters.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    scaled = parameters.get("rope_type", parameters.get("type", "default")) != "default"
    return {"rope_theta": float(theta), **({"rope_scaling": parameters} if scaled else {})}


def head_for_target(
    target: PreTrainedModel, draft_token_ids: Sequence[int], feature_layers: Sequence[int] | None = None
) -> Eagle3Head:
    """A new head for `target`, shaped like one of its layers (width, heads, MLP, rope, norm epsilon), reading its
    embeddings, over the draft vocabulary `draft_token_ids` (target ids; d2t and t2d follow from them), reading
    `feature_layers` (default: the peers' default, then left out of the config). Weights are PyTorch's default
    initialisation; on the target's device and in its dtype."""
    text = target.config.get_text_config()
    vocab = int(target.get_input_embeddings().weight.shape[0])
    ids = torch.tensor(sorted(set(int(token) for token in draft_token_ids)), dtype=torch.long)
    if not len(ids) or int(ids[0]) < 0 or int(ids[-1]) >= vocab:
        raise SpeculorError(f"draft token ids must be target ids in 0..{vocab - 1}")
    rope = hub_rope_settings(text)
    heads = int(text.num_attention_heads)
    config = Eagle3Config(
        hidden_size=int(text.hidden_size),
        intermediate_size=int(text.intermediate_size),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        rms_norm_eps=float(getattr(text, "rms_norm_eps", 1e-6)),
        vocab_size=vocab,
        draft_vocab_size=len(ids),
        target_hidden_size=int(text.hidden_size),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 2048)),
        feature_layers=tuple(feature_layers) if feature_layers is not None else None,
        rope=rope or None,
    )
    head = Eagle3Head(config, embed=target.get_input_embeddings().weight)
    with torch.no_grad():
        head.d2t.copy_(ids - torch.arange(len(ids)))
        head.t2d.zero_()
        head.t2d[ids] = True
    parameter = target.get_input_embeddings().weight
    return head.to(device=parameter.device, dtype=parameter.dtype)


def load_eagle3(source: str | os.PathLike, target: PreTrainedModel) -> tuple[Eagle3Head, tuple[int, ...]]:
    """Load the head saved in directory `source` for `target` (on its device, in its dtype), checking that it fits;
    returns it with the target layers it reads."""
    directory = Path(source)
    try:
        config = Eagle3Config.from_dict(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError, KeyError) as error:
        raise SpeculorError(f"cannot read the EAGLE-3 head's config in {directory}: {error}") from error
    weights = _read_weights(directory)
    head = Eagle3Head(config, embed=target.get_input_embeddings().weight)
    if "embed_tokens.weight" in weights:
        head.embed_tokens = nn.Embedding(*weights["embed_tokens.weight"].shape)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise SpeculorError(f"the EAGLE-3 head in {directory} lacks {', '.join(missing[:4])}")
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise SpeculorError(
                f"the EAGLE-3 head's {name} has shape {tuple(weights[name].shape)}, its config implies "
                f"{tuple(tensor.shape)}"
            )
    head.load_state_dict({name: weights[name] for name in expected})
    layers = head.check_fits(target)
    parameter = target.get_input_embeddings().weight
    return head.to(device=parameter.device, dtype=parameter.dtype).eval(), layers


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The head's tensors by name, from model.safetensors or pytorch_model.bin."""
    if (directory / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        return load_file(directory / WEIGHTS_FILE)
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise SpeculorError(f"no {WEIGHTS_FILE} or pytorch_model.bin in the EAGLE-3 head directory {directory}")


def save_eagle3(head: Eagle3Head, directory: str | os.PathLike, dtype: torch.dtype = torch.float16) -> None:
    """Write the head in the hub layout: config.json and model.safetensors (weights in `dtype`, d2t int64, t2d
    bool), loadable by `load_eagle3`, vLLM and SGLang."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
        for name, tensor in head.state_dict().items()
    }
    save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(head.config.to_dict(dtype), indent=2) + "\n")


class _FeatureStore:
    """One slot's target features not yet fed to the head, as (start position, (count, width)) chunks in order.

    Features are keyed by position, and a forward that writes from position s makes everything the slot held from
    s on stale (the target's cache was cut back to s first), so a write drops what lies at or past its start. Then
    whatever the store holds below the target's length is what the target computed for the tokens it holds."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, torch.Tensor]] = []

    def write(self, start: int, features: torch.Tensor) -> None:
        chunks = self.chunks
        while chunks and chunks[-1][0] >= start:
            chunks.pop()
        if chunks and chunks[-1][0] + chunks[-1][1].shape[0] > start:
            first, kept = chunks[-1]
            chunks[-1] = (first, kept[: start - first])
        chunks.append((start, features))

    def take(self, begin: int, end: int) -> torch.Tensor:
        """The features of positions begin..end − 1, forgetting everything before `end` (the head will never need
        them again: it only goes forward)."""
        pieces = []
        for first, features in self.chunks:
            low, high = max(begin, first), min(end, first + features.shape[0])
            if low < high:
                pieces.append(features[low - first : high - first])
        if sum(piece.shape[0] for piece in pieces) != end - begin:
            raise SpeculorError(f"the target's features for positions {begin}..{end - 1} were never captured")
        kept = []
        for first, features in self.chunks:
            if first + features.shape[0] > end:
                kept.append((max(first, end), features[max(0, end - first) :]))
        self.chunks = kept
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class Eagle3Proposer:
    """Drafts a chain of γ tokens per row with an EAGLE-3 head over the target's own hidden states.

    At construction it asks the target runner, once, for its features (`FeatureSource.capture_features`); the
    runner hands them over after every prefill chunk and step, and they wait per slot, keyed by position
    (`_FeatureStore`), until the row next drafts. A row whose context holds L tokens has had positions 0..L − 2
    through the target, and the head has fed its cache up to `fed` of them: a proposal first feeds positions
    fed..L − 2 in one forward (each with the target's features there and the next committed token: a prompt, the
    tokens accepted last step, or steps without drafting), whose last position gives the first draft, then γ − 1
    one-token forwards on the head's own output. Drafted positions stay in the head's cache only until the next
    proposal overwrites them with the target's features, so a rejection needs no rollback here, and the target's
    rollback is seen as its next write (see `_FeatureStore`). Rows pad to the widest; padding writes land past the
    row's end (or on a spare last cache position) and are never attended to.

    q is the head's distribution over its draft vocabulary spread onto the target's (zero outside it), computed by
    `speculor.sampling.sample_rows` as every proposer does, so the acceptance rule and seeded coupling stay exact.
    """

    def __init__(
        self, head: Eagle3Head, layers: Sequence[int], target: Runner, vocab_size: int, slots: int | None = None
    ) -> None:
        if not isinstance(target, FeatureSource):
            raise SpeculorError(f"{type(target).__name__} cannot capture target features for an EAGLE-3 head")
        self.head = head
        self.vocab_size = vocab_size
        self.device = target.device
        config = head.config
        slots = slots or target.slots
        # One spare position at the end, where padding that would run past a row's context is written.
        self.capacity = target.max_length + 1
        parameter = head.lm_head.weight
        self.cache = torch.zeros(
            (slots, 2, config.num_key_value_heads, self.capacity, config.head_dim),
            dtype=parameter.dtype,
            device=self.device,
        )
        self.cos, self.sin = head.rotary_tables(self.capacity)
        targets = head.draft_to_target
        kept = targets < vocab_size
        self._draft_ids = torch.nonzero(kept).view(-1)
        self._target_ids = targets[kept]
        self._fed = [0] * slots
        self._last_gamma = [-1] * slots
        self._stores = [_FeatureStore() for _ in range(slots)]
        target.capture_features(layers, self._receive)

    def draft_passes(self, gamma: int) -> int:
        """Head forwards a step of `gamma` tokens costs: one per token (each about one target layer)."""
        return gamma

    def reset(self, slot: int) -> None:
        self._fed[slot] = 0
        self._last_gamma[slot] = -1
        self._stores[slot] = _FeatureStore()

    def rollback(self, slot: int, committed_length: int) -> None:
        """Nothing to cut: the head's cache holds committed positions only below `fed` (≤ committed_length − 1,
        since contexts only grow), its drafted positions are overwritten by the next proposal, and stale target
        features are dropped when the target next writes over them."""

    def _receive(self, slots: Sequence[int], starts: Sequence[int], features: torch.Tensor) -> None:
        """The target runner's sink: keep a copy of each row's features (the runner may reuse its buffer)."""
        kept = features.detach().clone()
        for row, (slot, start) in enumerate(zip(slots, starts, strict=True)):
            self._stores[slot].write(start, kept[row])

    @torch.inference_mode()
    def propose(
        self,
        slots: Sequence[int],
        contexts: Sequence[list[int]],
        gammas: Sequence[int],
        sampling: RowSampling,
        confidence_thresholds: Sequence[float | None],
    ) -> Proposal:
        device, rows, gamma = self.device, len(slots), max(gammas)
        behind = [len(context) - 1 - self._fed[slot] for slot, context in zip(slots, contexts, strict=True)]
        caught_up = any(count > self._last_gamma[slot] + 1 for slot, count in zip(slots, behind, strict=True))
        width = max(behind)
        features = torch.stack(
            [
                F.pad(self._stores[slot].take(self._fed[slot], len(context) - 1), (0, 0, 0, width - count))
                for slot, context, count in zip(slots, contexts, behind, strict=True)
            ]
        )
        # Every per-row input of the proposal in one host-to-device copy.
        host_inputs = []
        for slot, context, count in zip(slots, contexts, behind, strict=True):
            host_inputs += context[self._fed[slot] + 1 :] + [0] * (width - count)
        host_inputs += [min(self._fed[slot] + offset, self.capacity - 1) for slot in slots for offset in range(width)]
        host_inputs += [*(count - 1 for count in behind), *gammas, *(len(context) for context in contexts)]
        inputs = torch.tensor(host_inputs, dtype=torch.long, device=device)
        tokens = inputs[: rows * width].view(rows, width)
        positions = inputs[rows * width : 2 * rows * width].view(rows, width)
        last_index, counts, lengths = inputs[2 * rows * width :].view(3, rows)
        slot_index = torch.tensor(list(slots), dtype=torch.long, device=device)
        span = min(max(self._fed[slot] for slot in slots) + width, self.capacity)
        output = self._forward(slot_index, tokens, self.head.fuse(features), positions, span)
        output = output[torch.arange(rows, device=device), last_index]
        for slot, context in zip(slots, contexts, strict=True):
            self._fed[slot] = len(context) - 1
            self._last_gamma[slot] = gamma
        thresholds = None
        if any(threshold is not None for threshold in confidence_thresholds):
            thresholds = torch.tensor([t if t is not None else 0.0 for t in confidence_thresholds], device=device)
        drafted: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        # The first chained forward reads the first draft at position L − 1 (its input: that token and the output
        # at L − 2, where the target's features were).
        next_position = lengths - 2
        longest = max(len(context) for context in contexts)
        for index in range(gamma):
            logits = self._target_logits(self.head.logits(output))
            at = lengths + index if sampling.any_sampled else lengths
            token, token_probs = sample_rows(logits, sampling, at, DRAFT_STREAM, drafted)
            drafted.append(token)
            if token_probs is not None:
                probs.append(token_probs)
            if thresholds is not None and index + 1 < gamma:
                source = token_probs if token_probs is not None else logits.float().softmax(-1)
                doubtful = source.gather(1, token[:, None]).squeeze(1) < thresholds
                counts = torch.where(doubtful, torch.minimum(counts, torch.full_like(counts, index + 1)), counts)
                # A host read per drafted token, paid only where a threshold is set.
                if bool((counts <= index + 1).all()):
                    break
            if index + 1 < gamma:
                next_position = (next_position + 1).clamp(max=self.capacity - 1)
                span = min(longest + index, self.capacity)
                output = self._forward(slot_index, token[:, None], output[:, None], next_position[:, None], span)
                output = output[:, 0]
        return Proposal(
            tokens=torch.stack(drafted, dim=1),
            counts=counts,
            probs=torch.stack(probs, dim=1) if probs else None,
            forwards=len(drafted),
            caught_up=caught_up,
        )

    def _forward(
        self,
        slot_index: torch.Tensor,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        span: int,
    ) -> torch.Tensor:
        """One head forward over (rows, k) positions of the listed slots: writes their keys and values into the
        slots' caches and returns the layer's output (rows, k, H), each position attending to its slot's cache up
        to itself. `span` (known on the host) bounds the cache positions read: above every position."""
        head, config = self.head, self.head.config
        query, key, value = head.queries_keys_values(tokens, hidden, self.cos[positions], self.sin[positions])
        rows = slot_index[:, None]
        self.cache[rows, 0, :, positions] = key
        self.cache[rows, 1, :, positions] = value
        cached = self.cache[slot_index, :, :, :span]
        allowed = torch.arange(span, device=self.device) <= positions[:, :, None]
        attended = F.scaled_dot_product_attention(
            query.transpose(1, 2),
            cached[:, 0],
            cached[:, 1],
            attn_mask=allowed[:, None],
            scale=config.head_dim**-0.5,
            enable_gqa=config.num_attention_heads != config.num_key_value_heads,
        )
        return head.finish(attended.transpose(1, 2).flatten(2), hidden)

    def _target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits (rows, draft_vocab) spread onto the target's first `vocab_size` ids, −inf
        elsewhere, so the probabilities sampling computes from them are q over the target's vocabulary."""
        spread = draft_logits.new_full((draft_logits.shape[0], self.vocab_size), float("-inf"))
        spread[:, self._target_ids] = draft_logits[:, self._draft_ids]
        return spread
