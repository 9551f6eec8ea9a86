"""The Llama-family forward pass as plain tensor functions over a model's own weights and a static KV cache.

Llama 2/3, Mistral, Qwen2 and Qwen3 share one decoder: RMSNorm, rotary attention with grouped key/value heads,
a gated MLP. They differ only in optional pieces read off the loaded modules: attention/MLP biases (Qwen2, Llama
with `attention_bias`), per-head q/k RMSNorm (Qwen3), the rotary frequencies (rope scaling types), the activation.
In float32 the logits agree with transformers to rounding; in bfloat16 a few operations round once where
transformers rounds twice (fused RMSNorm, the residual added inside the matrix product), for fewer launches.

No weight is held twice: `LlamaWeights` refers to the `PreTrainedModel`'s own tensors, after moving each layer's
q/k/v and gate/up projections into one tensor per group that the model's parameters then view (`fuse_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

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
    """One decoder layer's tensors, shared with the Hugging Face modules (see `fuse_rows`); optional pieces None.

    `qkv` stacks the query, key and value projections row-wise and `gate_up` the gate and up projections, so each
    group is one matrix product: at one token per step a product costs a launch whatever its size."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
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
    intermediate_size: int
    scaling: float
    eps: float
    activation: Callable[[torch.Tensor], torch.Tensor]
    activation_name: str
    inv_freq: torch.Tensor
    rope_scaling: float

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> LlamaWeights:
        """Collect `model`'s tensors, fusing each layer's projection groups in place; call `unsupported_reason`
        first."""
        backbone = model.model
        attention = backbone.layers[0].self_attn
        layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            layers.append(
                LayerWeights(
                    input_norm=layer.input_layernorm.weight,
                    qkv=fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj], "weight"),
                    qkv_bias=fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj], "bias"),
                    o=attn.o_proj.weight,
                    o_bias=attn.o_proj.bias,
                    q_norm=q_norm.weight if q_norm is not None else None,
                    k_norm=k_norm.weight if k_norm is not None else None,
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=fuse_rows([mlp.gate_proj, mlp.up_proj], "weight"),
                    gate_up_bias=fuse_rows([mlp.gate_proj, mlp.up_proj], "bias"),
                    down=mlp.down_proj.weight,
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
            intermediate_size=int(backbone.layers[0].mlp.gate_proj.weight.shape[0]),
            scaling=attention.scaling,
            eps=backbone.norm.variance_epsilon,
            activation=backbone.layers[0].mlp.act_fn,
            activation_name=str(getattr(config, "hidden_act", "")),
            inv_freq=backbone.rotary_emb.inv_freq,
            rope_scaling=backbone.rotary_emb.attention_scaling,
        )


def fuse_rows(modules: Sequence[torch.nn.Module], name: str) -> torch.Tensor | None:
    """One tensor holding the `name` parameters ("weight" or "bias") of `modules` stacked along dim 0, without
    keeping a second copy: the parameters are moved into it and the modules' parameters become views of it (same
    values, so the Hugging Face model computes exactly what it did). Parameters that are already such views (a
    second runner on the same model) are reused as they are. None when the modules have no such parameter."""
    parts = [getattr(module, name) for module in modules]
    if any(part is None for part in parts):
        return None
    first = parts[0]
    rows = sum(part.shape[0] for part in parts)
    offset = first.storage_offset()
    consecutive = True
    for part in parts:
        consecutive = consecutive and part.is_contiguous() and part.storage_offset() == offset
        consecutive = consecutive and part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        offset += part.numel()
    with torch.no_grad():
        if consecutive:
            return first.detach().as_strided((rows, *first.shape[1:]), first.stride())
        fused = torch.cat([part.detach() for part in parts])
        start = 0
        for part in parts:
            part.data = fused[start : start + part.shape[0]]
            start += part.shape[0]
    return fused


@dataclass(frozen=True)
class StaticCache:
    """Keys and values of every layer and sequence in one tensor, (layers, 2, sequences, kv_heads, capacity,
    head_dim), so that one indexed write stores a step's keys and values per layer; plus the rotary tables for every
    position the cache can hold. Each sequence (a runner's slot) is one row; positions past a row's length are
    stale and masked out."""

    kv: torch.Tensor
    cos: torch.Tensor
    signed_sin: torch.Tensor
    offsets: torch.Tensor

    @property
    def capacity(self) -> int:
        return int(self.kv.shape[4])

    @property
    def sequences(self) -> int:
        return int(self.kv.shape[2])

    @classmethod
    def allocate(cls, weights: LlamaWeights, sequences: int, capacity: int) -> StaticCache:
        embed = weights.embed
        shape = (len(weights.layers), 2, sequences, weights.kv_heads, capacity, weights.head_dim)
        cos, sin = rotary_tables(weights.inv_freq, weights.rope_scaling, capacity, embed.dtype)
        half = weights.head_dim // 2
        return cls(
            kv=torch.zeros(shape, dtype=embed.dtype, device=embed.device),
            cos=cos,
            signed_sin=torch.cat((-sin[:, :half], sin[:, half:]), dim=-1),
            offsets=torch.arange(capacity, device=embed.device),
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
    """RMSNorm as one fused kernel (float32 inside). transformers rounds to the model dtype before the weight
    multiply; this rounds once, which in bfloat16 is no less accurate and saves three launches per call."""
    return F.rms_norm(hidden, weight.shape, weight, eps)


def rotate_in_place(heads: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotary embedding of (tokens, heads, head_dim), half-split layout, in three launches: the rotated half is a
    roll of the head dimension whose sign lives in `signed_sin` = (−sin, +sin)."""
    rolled = heads.roll(heads.shape[-1] // 2, dims=-1)
    heads.mul_(cos).addcmul_(rolled, signed_sin)


def linear_residual(
    residual: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """residual + inputs @ weightᵀ (+ bias) with the residual added inside the matrix product (one launch)."""
    out = torch.addmm(residual, inputs, weight.t())
    return out if bias is None else out + bias


def to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor of `values` on `device`, sent from pinned memory on CUDA so that the host does not wait."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def causal_mask(cache: StaticCache, positions: torch.Tensor, rows: int, span: int, group: int, dtype: torch.dtype):
    """Additive mask (rows, 1, group·k, span) for `positions` (rows·k,), k tokens per row: a query sees the cache
    positions at or before its own. Query rows repeat per query head of a group, matching the folding in `attend`.
    Built once per step, shared by every layer."""
    allowed = cache.offsets[:span] <= positions.view(rows, -1, 1)
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    blocked = torch.full((), float("-inf"), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, blocked).repeat(1, group, 1)[:, None]


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of (rows·k, heads, head_dim) queries, k tokens per row, over each row's cached (rows, kv_heads,
    span, head_dim) keys and values.

    Grouped-query attention without repeating keys: the query heads that share a key/value head are folded into
    that head's query rows, so one SDPA call reads each cached key once; `mask` comes from `causal_mask`. Shapes
    depend only on (rows, k, span), so the call can be captured in a graph.
    """
    tokens, heads, head_dim = query.shape
    rows, kv_heads = keys.shape[:2]
    group, per_row = heads // kv_heads, tokens // rows
    folded = query.view(rows, per_row, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    folded = folded.reshape(rows, kv_heads, group * per_row, head_dim)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    out = out.view(rows, kv_heads, group, per_row, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(tokens, heads * head_dim)


def forward_tokens(
    weights: LlamaWeights,
    cache: StaticCache,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    sequences: torch.Tensor | Sequence[int],
    span: int,
    with_logits: bool,
    fused: ModuleType | None = None,
    logits_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Run `token_ids` (rows·k,) at `positions` (rows·k,) through the model, row by row: the k tokens of row i go
    to the cache row `sequences[i]`. Writes their keys/values into the cache and attends over each row's first
    `span` positions (span > every position). Returns float32 logits (rows·k, vocab) — in `logits_out` when given —
    or None. `sequences` is a (rows,) device tensor (graph capture: PyTorch's attention then gathers the rows'
    caches) or host ints (eager: each row's cache is read through views, one attention call per row, which on a
    CPU is much cheaper than a gather).

    Shapes depend only on (rows, k, span) and the positions and rows are tensors, so one capture serves every step
    of that shape: the same code runs eagerly (CPU, prefill) and inside a CUDA graph. Per layer it launches about a
    dozen kernels, since at decode time each launch costs more than the arithmetic of a small one. `fused` is
    `speculor.runners.triton_ops` (CUDA) to do the norms, the rotary embedding with the cache write, the activation
    and a step's attention in fused kernels (about half the launches; the attention then reads each row's cache
    in place, up to that row's own length, whatever `span`), or None for plain PyTorch.
    """
    tokens = token_ids.shape[0]
    heads, kv_heads, head_dim = weights.heads, weights.kv_heads, weights.head_dim
    eps, width, group = weights.eps, weights.intermediate_size, weights.heads // weights.kv_heads
    host_rows = None if isinstance(sequences, torch.Tensor) else list(sequences)
    rows = len(host_rows) if host_rows is not None else sequences.shape[0]
    if host_rows is not None and fused is not None:
        sequences = to_device(host_rows, token_ids.device)
    per_row = tokens // rows
    norm = fused.rms_norm if fused is not None else rms_norm
    hidden = F.embedding(token_ids, weights.embed)
    fused_attention = fused is not None and group * per_row <= fused.ATTENTION_MAX_ROWS
    if fused is None:
        cos, signed_sin = cache.cos[positions][:, None], cache.signed_sin[positions][:, None]
        token_rows = sequences[:, None].expand(rows, per_row).reshape(-1) if host_rows is None else None
    mask = None if fused_attention else causal_mask(cache, positions, rows, span, group, hidden.dtype)
    for index, layer in enumerate(weights.layers):
        normed = norm(hidden, layer.input_norm, eps)
        qkv = F.linear(normed, layer.qkv, layer.qkv_bias).view(tokens, heads + 2 * kv_heads, head_dim)
        query, key = qkv[:, :heads], qkv[:, heads : heads + kv_heads]
        layer_cache = cache.kv[index]
        if fused is not None:
            fused.rope_and_store(
                qkv,
                cache.cos,
                cache.signed_sin,
                positions,
                sequences,
                layer_cache,
                heads,
                layer.q_norm,
                layer.k_norm,
                eps,
            )
        else:
            if layer.q_norm is not None and layer.k_norm is not None:
                query.copy_(rms_norm(query, layer.q_norm, eps))
                key.copy_(rms_norm(key, layer.k_norm, eps))
            rotate_in_place(qkv[:, : heads + kv_heads], cos, signed_sin)
            keys_values = qkv[:, heads:].view(tokens, 2, kv_heads, head_dim)
            if host_rows is None:
                layer_cache[:, token_rows, :, positions] = keys_values
            else:
                for row, sequence in enumerate(host_rows):
                    part = slice(row * per_row, (row + 1) * per_row)
                    layer_cache[:, sequence].index_copy_(2, positions[part], keys_values[part].permute(1, 2, 0, 3))
        if fused_attention:
            attended = fused.attention(query, layer_cache, positions, sequences, weights.scaling)
        elif host_rows is None:
            rows_cache = layer_cache[:, sequences, :, :span]
            attended = attend(query, rows_cache[0], rows_cache[1], mask, weights.scaling)
        else:
            parts = []
            for row, sequence in enumerate(host_rows):
                row_cache = layer_cache[:, sequence, None, :, :span]
                part = query[row * per_row : (row + 1) * per_row]
                parts.append(attend(part, row_cache[0], row_cache[1], mask[row : row + 1], weights.scaling))
            attended = parts[0] if rows == 1 else torch.cat(parts)
        hidden = linear_residual(hidden, attended, layer.o, layer.o_bias)
        normed = norm(hidden, layer.post_norm, eps)
        gate_up = F.linear(normed, layer.gate_up, layer.gate_up_bias)
        if fused is not None and weights.activation_name in ("silu", "swish"):
            gated = fused.silu_and_multiply(gate_up, width)
        else:
            gated = weights.activation(gate_up[:, :width]) * gate_up[:, width:]
        hidden = linear_residual(hidden, gated, layer.down, layer.down_bias)
    if not with_logits:
        return None
    normed = norm(hidden, weights.final_norm, eps)
    if logits_out is None:
        return F.linear(normed, weights.lm_head).float()
    if normed.dtype == torch.float32:
        return torch.mm(normed, weights.lm_head.t(), out=logits_out)
    return logits_out.copy_(F.linear(normed, weights.lm_head))
