"""The Llama-family forward pass as plain tensor functions over a model's own weights and a static KV cache.

Llama 2/3, Mistral, Qwen2/3 and Gemma 1/2/3 share one decoder: RMSNorm, rotary attention with grouped key/value
heads, a gated MLP. They differ only in optional pieces read off the loaded modules and config: attention/MLP
biases (Qwen2, Llama with `attention_bias`), per-head q/k RMSNorm (Qwen3, Gemma 3), the rotary frequencies (rope
scaling types; Gemma 3's local layers have their own base), the activation, sliding-window attention on some or all
layers (Mistral, Qwen2/3 with a window, Gemma 2/3's alternating local/global layers), and Gemma's extras: norms
that scale by (1 + weight), an embedding scaled by √hidden, norms on the attention and MLP outputs (Gemma 2/3), and
tanh soft-capping of attention scores and of the final logits (Gemma 2). A sliding window only masks: the static
cache keeps every position, which is exact and keeps one cache layout for all layers.

In float32 the logits agree with transformers to rounding; in bfloat16 a few operations round once where
transformers rounds twice (fused RMSNorm, the residual added inside the matrix product), for fewer launches.

No weight matrix is held twice: `LlamaWeights` refers to the `PreTrainedModel`'s own tensors, after moving each
layer's q/k/v and gate/up projections into one tensor per group that the model's parameters then view
(`fuse_rows`). Only Gemma's norm weights are copied, as float32 (1 + weight), a few vectors per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# Gemma's RMSNorm scales by (1 + weight), computed in float32.
OFFSET_NORM_MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# Rope types whose frequencies are fixed at load time; "dynamic" and "longrope" change them with the length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported_reason(model: PreTrainedModel, max_length: int) -> str | None:
    """Why the fast path cannot run `model` exactly (None when it can). `max_length` is the longest sequence the
    runner will hold (unused since sliding windows are supported; kept for the callers' signature)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"architecture {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    backbone = getattr(model, "model", None)
    if backbone is None or not hasattr(backbone, "layers") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a causal LM with a `model.layers` backbone and an `lm_head`"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= set(SUPPORTED_LAYER_TYPES):
        return f"layer types {sorted(layer_types)} are not all among {', '.join(SUPPORTED_LAYER_TYPES)}"
    for name, (_, _, rope_type) in rotary_kinds(backbone.rotary_emb).items():
        if rope_type not in STATIC_ROPE_TYPES:
            where = f" ({name} layers)" if name else ""
            return f"rope type {rope_type!r}{where} is not one of {', '.join(STATIC_ROPE_TYPES)}"
    devices = {parameter.device for parameter in model.parameters()}
    if len(devices) != 1:
        return f"the weights are spread over several devices ({', '.join(sorted(map(str, devices)))})"
    dtypes = {parameter.dtype for parameter in model.parameters()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return f"the weights are not in one floating-point dtype ({', '.join(sorted(map(str, dtypes)))})"
    return None


def rotary_kinds(rotary: torch.nn.Module) -> dict[str, tuple[torch.Tensor, float, str]]:
    """(inverse frequencies, attention scaling, rope type) by layer type: one entry named "" for a model whose
    layers share one rotary embedding, one per layer type where each has its own (Gemma 3: local and global)."""
    if hasattr(rotary, "inv_freq"):
        return {"": (rotary.inv_freq, rotary.attention_scaling, getattr(rotary, "rope_type", None))}
    return {
        layer_type: (
            getattr(rotary, f"{layer_type}_inv_freq"),
            getattr(rotary, f"{layer_type}_attention_scaling"),
            rope,
        )
        for layer_type, rope in rotary.rope_type.items()
    }


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors, shared with the Hugging Face modules (see `fuse_rows`); optional pieces None.

    `qkv` stacks the query, key and value projections row-wise and `gate_up` the gate and up projections, so each
    group is one matrix product: at one token per step a product costs a launch whatever its size. `mlp_norm` is
    the norm before the MLP (Llama's `post_attention_layernorm`, Gemma 2's `pre_feedforward_layernorm`);
    `attention_output_norm` and `mlp_output_norm` normalize a block's output before the residual add (Gemma 2/3).
    `window` is the sliding window (keys more than `window - 1` positions back are masked), `rope_table` the index
    of the layer's rotary table in the cache."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    attention_output_norm: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    mlp_output_norm: torch.Tensor | None
    window: int | None
    rope_table: int


@dataclass(frozen=True)
class LlamaWeights:
    """The whole model: weights by reference plus the shapes and constants the forward pass needs. `rope` holds
    (inverse frequencies, attention scaling) per rotary table; `embed_scale` multiplies the embeddings (Gemma: √hidden
    in the model dtype); the soft-caps are tanh caps on attention scores and on the final logits (Gemma 2). With a
    process `group` the weights are one rank's shard (`speculor.runners.tensor_parallel`): `heads` and `kv_heads`
    count this rank's heads, and the attention and MLP outputs are summed over the group."""

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
    rope: tuple[tuple[torch.Tensor, float], ...]
    embed_scale: torch.Tensor | None
    attention_softcap: float | None
    logit_softcap: float | None
    group: dist.ProcessGroup | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> LlamaWeights:
        """Collect `model`'s tensors, fusing each layer's projection groups in place; call `unsupported_reason`
        first."""
        backbone, config = model.model, model.config
        attention = backbone.layers[0].self_attn
        offset = config.model_type in OFFSET_NORM_MODEL_TYPES

        def norm(module: torch.nn.Module | None) -> torch.Tensor | None:
            if module is None:
                return None
            return (1.0 + module.weight.detach().float()) if offset else module.weight

        kinds = rotary_kinds(backbone.rotary_emb)
        tables = {name: index for index, name in enumerate(kinds)}
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * len(backbone.layers)
        layers = []
        for layer, layer_type in zip(backbone.layers, layer_types, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            # Mistral's modules read the window off the config; the others set it per layer (None on global ones).
            window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
            pre_mlp = getattr(layer, "pre_feedforward_layernorm", None)
            layers.append(
                LayerWeights(
                    input_norm=norm(layer.input_layernorm),
                    qkv=fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj], "weight"),
                    qkv_bias=fuse_rows([attn.q_proj, attn.k_proj, attn.v_proj], "bias"),
                    o=attn.o_proj.weight,
                    o_bias=attn.o_proj.bias,
                    q_norm=norm(getattr(attn, "q_norm", None)),
                    k_norm=norm(getattr(attn, "k_norm", None)),
                    attention_output_norm=norm(layer.post_attention_layernorm) if pre_mlp is not None else None,
                    mlp_norm=norm(pre_mlp if pre_mlp is not None else layer.post_attention_layernorm),
                    gate_up=fuse_rows([mlp.gate_proj, mlp.up_proj], "weight"),
                    gate_up_bias=fuse_rows([mlp.gate_proj, mlp.up_proj], "bias"),
                    down=mlp.down_proj.weight,
                    down_bias=mlp.down_proj.bias,
                    mlp_output_norm=norm(getattr(layer, "post_feedforward_layernorm", None)),
                    window=window,
                    rope_table=tables.get(layer_type, 0),
                )
            )
        embed_scale = getattr(backbone.embed_tokens, "embed_scale", None)
        final_norm = backbone.norm
        return cls(
            embed=backbone.embed_tokens.weight,
            layers=tuple(layers),
            final_norm=norm(final_norm),
            lm_head=model.lm_head.weight,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=attention.head_dim,
            intermediate_size=int(backbone.layers[0].mlp.gate_proj.weight.shape[0]),
            scaling=attention.scaling,
            eps=getattr(final_norm, "variance_epsilon", None) or final_norm.eps,
            activation=backbone.layers[0].mlp.act_fn,
            activation_name=str(getattr(config, "hidden_act", "")),
            rope=tuple((inv_freq, scaling) for inv_freq, scaling, _ in kinds.values()),
            embed_scale=embed_scale.to(backbone.embed_tokens.weight.dtype) if embed_scale is not None else None,
            attention_softcap=getattr(config, "attn_logit_softcapping", None),
            logit_softcap=getattr(config, "final_logit_softcapping", None),
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
    position the cache can hold, one per rotary kind (tables, capacity, head_dim). Each sequence (a runner's slot)
    is one row; positions past a row's length are stale and masked out."""

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
        tables = [rotary_tables(inv_freq, scaling, capacity, embed.dtype) for inv_freq, scaling in weights.rope]
        half = weights.head_dim // 2
        return cls(
            kv=torch.zeros(shape, dtype=embed.dtype, device=embed.device),
            cos=torch.stack([cos for cos, _ in tables]),
            signed_sin=torch.stack([torch.cat((-sin[:, :half], sin[:, half:]), dim=-1) for _, sin in tables]),
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
    multiply; this rounds once, which in bfloat16 is no less accurate and saves three launches per call. A float32
    `weight` on a lower-precision `hidden` (Gemma's 1 + weight) normalizes in float32 and rounds at the end, as
    transformers does for Gemma."""
    if weight.dtype != hidden.dtype:
        return F.rms_norm(hidden.float(), weight.shape, weight, eps).to(hidden.dtype)
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


def causal_mask(
    cache: StaticCache,
    positions: torch.Tensor,
    rows: int,
    span: int,
    group: int,
    dtype: torch.dtype,
    window: int | None,
) -> torch.Tensor:
    """Additive mask (rows, 1, group·k, span) for `positions` (rows·k,), k tokens per row: a query sees the cache
    positions at or before its own, and with a sliding `window` only the last `window` of them. Query rows repeat
    per query head of a group, matching the folding in `attend`. Built once per step and window, shared by every
    layer."""
    keys, queries = cache.offsets[:span], positions.view(rows, -1, 1)
    allowed = keys <= queries
    if window is not None:
        allowed &= keys > queries - window
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    blocked = torch.full((), float("-inf"), dtype=dtype, device=positions.device)
    return torch.where(allowed, zero, blocked).repeat(1, group, 1)[:, None]


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of (rows·k, heads, head_dim) queries, k tokens per row, over each row's cached (rows, kv_heads,
    span, head_dim) keys and values.

    Grouped-query attention without repeating keys: the query heads that share a key/value head are folded into
    that head's query rows, so one call reads each cached key once; `mask` comes from `causal_mask`. With a
    `softcap` the scores are soft-capped (cap · tanh(score / cap)) before the mask, which SDPA cannot do, so the
    attention is spelled out as transformers' eager path does (float32 softmax). Shapes depend only on (rows, k,
    span), so the call can be captured in a graph.
    """
    tokens, heads, head_dim = query.shape
    rows, kv_heads = keys.shape[:2]
    group, per_row = heads // kv_heads, tokens // rows
    folded = query.view(rows, per_row, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    folded = folded.reshape(rows, kv_heads, group * per_row, head_dim)
    if softcap is None:
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    else:
        scores = torch.matmul(folded, keys.transpose(-1, -2)) * scaling
        scores = torch.tanh(scores / softcap) * softcap + mask
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype), values)
    out = out.view(rows, kv_heads, group, per_row, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(tokens, heads * head_dim)


@dataclass(frozen=True)
class FeatureTap:
    """Where `forward_tokens` copies the hidden states entering some layers (target features for an EAGLE-3 head):
    the state entering layer `layers[j]` goes to columns j·hidden … (j + 1)·hidden of `out` (tokens, len(layers) ·
    hidden), a buffer that may be static, so the copy can be captured in a CUDA graph."""

    layers: tuple[int, ...]
    out: torch.Tensor

    def columns(self, index: int, hidden: int) -> list[slice]:
        """The column ranges of `out` that the state entering layer `index` fills (none, one, or several when a
        layer is listed twice)."""
        return [slice(j * hidden, (j + 1) * hidden) for j, layer in enumerate(self.layers) if layer == index]


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
    tap: FeatureTap | None = None,
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
    if weights.embed_scale is not None:
        hidden = hidden * weights.embed_scale
    fused_attention = fused is not None and group * per_row <= fused.ATTENTION_MAX_ROWS
    if fused is None:
        rotations = [
            (cos[positions][:, None], sin[positions][:, None])
            for cos, sin in zip(cache.cos, cache.signed_sin, strict=True)
        ]
        token_rows = sequences[:, None].expand(rows, per_row).reshape(-1) if host_rows is None else None
    masks = {}
    if not fused_attention:
        for window in {layer.window for layer in weights.layers}:
            masks[window] = causal_mask(cache, positions, rows, span, group, hidden.dtype, window)
    for index, layer in enumerate(weights.layers):
        if tap is not None:
            for columns in tap.columns(index, hidden.shape[-1]):
                tap.out[:, columns].copy_(hidden)
        normed = norm(hidden, layer.input_norm, eps)
        qkv = F.linear(normed, layer.qkv, layer.qkv_bias).view(tokens, heads + 2 * kv_heads, head_dim)
        query, key = qkv[:, :heads], qkv[:, heads : heads + kv_heads]
        layer_cache = cache.kv[index]
        if fused is not None:
            cos, signed_sin = cache.cos[layer.rope_table], cache.signed_sin[layer.rope_table]
            fused.rope_and_store(
                qkv, cos, signed_sin, positions, sequences, layer_cache, heads, layer.q_norm, layer.k_norm, eps
            )
        else:
            if layer.q_norm is not None and layer.k_norm is not None:
                query.copy_(rms_norm(query, layer.q_norm, eps))
                key.copy_(rms_norm(key, layer.k_norm, eps))
            rotate_in_place(qkv[:, : heads + kv_heads], *rotations[layer.rope_table])
            keys_values = qkv[:, heads:].view(tokens, 2, kv_heads, head_dim)
            store_rows(layer_cache, keys_values, positions, token_rows, host_rows)
        if fused_attention:
            softcap = weights.attention_softcap
            attended = fused.attention(query, layer_cache, positions, sequences, weights.scaling, layer.window, softcap)
        else:
            attended = attend_rows(query, layer_cache, sequences, host_rows, span, masks[layer.window], weights)
        hidden = residual_block(
            hidden, attended, layer.o, layer.o_bias, layer.attention_output_norm, norm, eps, weights.group
        )
        normed = norm(hidden, layer.mlp_norm, eps)
        gate_up = F.linear(normed, layer.gate_up, layer.gate_up_bias)
        if fused is not None and weights.activation_name in fused.GATED_ACTIVATIONS:
            gated = fused.gated_activation(gate_up, width, weights.activation_name)
        else:
            gated = weights.activation(gate_up[:, :width]) * gate_up[:, width:]
        hidden = residual_block(
            hidden, gated, layer.down, layer.down_bias, layer.mlp_output_norm, norm, eps, weights.group
        )
    if not with_logits:
        return None
    normed = norm(hidden, weights.final_norm, eps)
    if logits_out is None:
        logits = F.linear(normed, weights.lm_head).float()
    elif normed.dtype == torch.float32:
        logits = torch.mm(normed, weights.lm_head.t(), out=logits_out)
    else:
        logits = logits_out.copy_(F.linear(normed, weights.lm_head))
    if weights.logit_softcap is not None:
        logits.div_(weights.logit_softcap).tanh_().mul_(weights.logit_softcap)
    return logits


def store_rows(
    layer_cache: torch.Tensor,
    keys_values: torch.Tensor,
    positions: torch.Tensor,
    token_rows: torch.Tensor | None,
    host_rows: list[int] | None,
) -> None:
    """Write a step's (tokens, 2, kv_heads, head_dim) keys and values into `layer_cache` at `positions`: one indexed
    write by each token's cache row (`token_rows`, on the device), or one `index_copy_` per row (`host_rows`)."""
    if host_rows is None:
        layer_cache[:, token_rows, :, positions] = keys_values
        return
    if len(host_rows) == 1:
        layer_cache[:, host_rows[0]].index_copy_(2, positions, keys_values.permute(1, 2, 0, 3))
        return
    per_row = keys_values.shape[0] // len(host_rows)
    for row, sequence in enumerate(host_rows):
        part = slice(row * per_row, (row + 1) * per_row)
        layer_cache[:, sequence].index_copy_(2, positions[part], keys_values[part].permute(1, 2, 0, 3))


def attend_rows(
    query: torch.Tensor,
    layer_cache: torch.Tensor,
    sequences: torch.Tensor,
    host_rows: list[int] | None,
    span: int,
    mask: torch.Tensor,
    weights: LlamaWeights,
) -> torch.Tensor:
    """PyTorch attention of each row over its cache row: one call over the gathered rows (`sequences` on the
    device), or one call per row over views (`host_rows`)."""
    scaling, softcap = weights.scaling, weights.attention_softcap
    if host_rows is None:
        rows_cache = layer_cache[:, sequences, :, :span]
        return attend(query, rows_cache[0], rows_cache[1], mask, scaling, softcap)
    if len(host_rows) == 1:
        row_cache = layer_cache[:, host_rows[0], None, :, :span]
        return attend(query, row_cache[0], row_cache[1], mask, scaling, softcap)
    per_row = query.shape[0] // len(host_rows)
    parts = []
    for row, sequence in enumerate(host_rows):
        row_cache = layer_cache[:, sequence, None, :, :span]
        part = query[row * per_row : (row + 1) * per_row]
        parts.append(attend(part, row_cache[0], row_cache[1], mask[row : row + 1], scaling, softcap))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def residual_block(
    residual: torch.Tensor,
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    output_norm: torch.Tensor | None,
    norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
    eps: float,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """residual + (inputs @ weightᵀ + bias), the product normalized by `output_norm` first where the model has one
    (Gemma 2/3); without it the residual is added inside the matrix product (`linear_residual`). With a tensor-parallel
    `group`, `inputs` and `weight` hold this rank's slice of the reduced dimension: the partial products are summed
    over the ranks (one all-reduce, capturable in a CUDA graph under NCCL) before the bias, norm and residual, which
    every rank holds whole."""
    if group is not None:
        product = F.linear(inputs, weight)
        dist.all_reduce(product, group=group)
        if bias is not None:
            product = product + bias
        return residual + (product if output_norm is None else norm(product, output_norm, eps))
    if output_norm is None:
        return linear_residual(residual, inputs, weight, bias)
    return residual + norm(F.linear(inputs, weight, bias), output_norm, eps)
