"""The Llama-family forward pass as plain tensor functions over a model's own weights and a static KV cache.

Llama 2/3, Mistral, Qwen2 and Qwen3 share one decoder: RMSNorm, rotary attention with grouped key/value heads,
a gated MLP. They differ only in optional pieces read off the loaded modules: attention/MLP biases (Qwen2, Llama
with `attention_bias`), per-head q/k RMSNorm (Qwen3), the rotary frequencies (rope scaling types), the activation.
Every operation mirrors the order and precision of transformers' implementation (RMSNorm in float32 then the
weight multiply in the model dtype, cos/sin computed in float32 and cast), so in float32 the logits agree with
transformers to rounding.

Nothing here copies a weight: `LlamaWeights` holds references to the `PreTrainedModel`'s own parameter tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Rope types whose frequencies are fixed at load time; "dynamic" and "longrope" change them with the length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported_reason(model: PreTrainedModel, max_length: int) -> str | None:
    """Why the fast path cannot run `model` exactly (None when it can). `max_length` is the longest sequence the
    runner will hold: a sliding window at least that long never masks anything, so it is not "in use"."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"architecture {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    backbone = getattr(model, "model", None)
    if backbone is None or not hasattr(backbone, "layers") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a causal LM with a `model.layers` backbone and an `lm_head`"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"layer types {sorted(layer_types)} include sliding-window attention"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < max_length:
        return f"sliding window of {window} tokens is in use below the {max_length}-token cache"
    rope_type = getattr(backbone.rotary_emb, "rope_type", None)
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} is not one of {', '.join(STATIC_ROPE_TYPES)}"
    devices = {parameter.device for parameter in model.parameters()}
    if len(devices) != 1:
        return f"the weights are spread over several devices ({', '.join(sorted(map(str, devices)))})"
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return f"the weights are not in one floating-point dtype ({', '.join(sorted(map(str, dtypes)))})"
    return None


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors (shared with the Hugging Face modules); biases and q/k norms may be absent."""

    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None


@dataclass(frozen=True)
class LlamaWeights:
    """The whole model: weights by reference plus the shapes and constants the forward pass needs."""

    embed: torch.Tensor
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float
    activation: Callable[[torch.Tensor], torch.Tensor]
    inv_freq: torch.Tensor
    rope_scaling: float

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> LlamaWeights:
        """Collect references to `model`'s tensors; call `unsupported_reason` first."""
        backbone = model.model
        attention = backbone.layers[0].self_attn
        layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight,
                    q=attn.q_proj.weight,
                    k=attn.k_proj.weight,
                    v=attn.v_proj.weight,
                    o=attn.o_proj.weight,
                    q_bias=attn.q_proj.bias,
                    k_bias=attn.k_proj.bias,
                    v_bias=attn.v_proj.bias,
                    o_bias=attn.o_proj.bias,
                    q_norm=q_norm.weight if q_norm is not None else None,
                    k_norm=k_norm.weight if k_norm is not None else None,
                    post_norm=layer.post_attention_layernorm.weight,
                    gate=mlp.gate_proj.weight,
                    up=mlp.up_proj.weight,
                    down=mlp.down_proj.weight,
                    gate_bias=mlp.gate_proj.bias,
                    up_bias=mlp.up_proj.bias,
                    down_bias=mlp.down_proj.bias,
                )
            )
        config = model.config
        return cls(
            embed=backbone.embed_tokens.weight,
            layers=tuple(layers),
            final_norm=backbone.norm.weight,
            lm_head=model.lm_head.weight,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=attention.head_dim,
            scaling=attention.scaling,
            eps=backbone.norm.variance_epsilon,
            activation=backbone.layers[0].mlp.act_fn,
            inv_freq=backbone.rotary_emb.inv_freq,
            rope_scaling=backbone.rotary_emb.attention_scaling,
        )


@dataclass(frozen=True)
class StaticCache:
    """Keys and values for every layer, (layers, kv_heads, capacity, head_dim) each, plus the rotary tables for
    every position the cache can hold. Slots past the runner's length are stale and masked out."""

    keys: torch.Tensor
    values: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[2])

    @classmethod
    def allocate(cls, weights: LlamaWeights, capacity: int) -> StaticCache:
        embed = weights.embed
        shape = (len(weights.layers), weights.kv_heads, capacity, weights.head_dim)
        cos, sin = rotary_tables(weights.inv_freq, weights.rope_scaling, capacity, embed.dtype)
        return cls(
            keys=torch.zeros(shape, dtype=embed.dtype, device=embed.device),
            values=torch.zeros(shape, dtype=embed.dtype, device=embed.device),
            cos=cos,
            sin=sin,
            slots=torch.arange(capacity, device=embed.device),
        )


def rotary_tables(
    inv_freq: torch.Tensor, scaling: float, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..length-1, (length, head_dim), computed in float32 as transformers does."""
    positions = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq.float())
    doubled = torch.cat((angles, angles), dim=-1)
    return (doubled.cos() * scaling).to(dtype), (doubled.sin() * scaling).to(dtype)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize in float32, scale in the model dtype (transformers' LlamaRMSNorm, operation for operation)."""
    upcast = hidden.float()
    upcast = upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)
    return weight * upcast.to(hidden.dtype)


def rotate(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (tokens, heads, head_dim) with (tokens, 1, head_dim) tables, half-split layout."""
    half = hidden.shape[-1] // 2
    rotated = torch.cat((-hidden[..., half:], hidden[..., :half]), dim=-1)
    return hidden * cos + rotated * sin


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of (tokens, heads, head_dim) queries over one layer's cached (kv_heads, span, head_dim).

    Grouped-query attention without repeating keys: the query heads that share a key/value head are folded into
    that head's rows, so one SDPA call reads each cached key once. `allowed` (tokens, span) is the causal mask
    from positions, fixed in shape so that the call can be captured in a graph.
    """
    tokens, heads, head_dim = query.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    folded = query.view(tokens, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, head_dim)
    mask = allowed.repeat(group, 1)
    out = F.scaled_dot_product_attention(folded, keys[None], values[None], attn_mask=mask, scale=scaling)
    return out.view(kv_heads, group, tokens, head_dim).permute(2, 0, 1, 3).reshape(tokens, heads * head_dim)


def forward_tokens(
    weights: LlamaWeights,
    cache: StaticCache,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    span: int,
    with_logits: bool,
) -> torch.Tensor | None:
    """Run `token_ids` (k,) at `positions` (k,) through the model: write their keys/values into the cache and
    attend over its first `span` slots (span > every position). Returns float32 logits (k, vocab) or None.

    Shapes depend only on k and span, and the positions are a tensor, so one capture serves every step of that
    shape: the same code runs eagerly (CPU, prefill) and inside a CUDA graph.
    """
    tokens = token_ids.shape[0]
    hidden = F.embedding(token_ids, weights.embed)
    cos, sin = cache.cos[positions][:, None], cache.sin[positions][:, None]
    allowed = cache.slots[None, :span] <= positions[:, None]
    for index, layer in enumerate(weights.layers):
        normed = rms_norm(hidden, layer.input_norm, weights.eps)
        query = F.linear(normed, layer.q, layer.q_bias).view(tokens, weights.heads, weights.head_dim)
        key = F.linear(normed, layer.k, layer.k_bias).view(tokens, weights.kv_heads, weights.head_dim)
        value = F.linear(normed, layer.v, layer.v_bias).view(tokens, weights.kv_heads, weights.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            query, key = rms_norm(query, layer.q_norm, weights.eps), rms_norm(key, layer.k_norm, weights.eps)
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        layer_keys, layer_values = cache.keys[index], cache.values[index]
        layer_keys.index_copy_(1, positions, key.transpose(0, 1))
        layer_values.index_copy_(1, positions, value.transpose(0, 1))
        attended = attend(query, layer_keys[:, :span], layer_values[:, :span], allowed, weights.scaling)
        hidden = hidden + F.linear(attended, layer.o, layer.o_bias)
        normed = rms_norm(hidden, layer.post_norm, weights.eps)
        gated = weights.activation(F.linear(normed, layer.gate, layer.gate_bias)) * F.linear(
            normed, layer.up, layer.up_bias
        )
        hidden = hidden + F.linear(gated, layer.down, layer.down_bias)
    if not with_logits:
        return None
    return F.linear(rms_norm(hidden, weights.final_norm, weights.eps), weights.lm_head).float()
