"""Fused Triton kernels for the fast runner's small per-layer operations (CUDA only; imported lazily).

Why: at one token per step an 8B model's matrix products already run near the memory-bandwidth floor, and what
is left is a few hundred small kernels per step, each paying a minimum duration of a few microseconds
(benchmarks/RESULTS.md, GPU section). These kernels each do in one launch what plain PyTorch does in several:

- `rms_norm`: one program per row, float32 inside, rounded once (as `F.rms_norm`, whose CUDA kernel takes about
  twice as long on a 4096-wide row).
- `rope_and_store`: for every token, the optional per-head q/k RMSNorm (Qwen3), the rotary embedding of queries
  and keys, and the write of keys and values into the static cache at the token's position: one launch instead of
  about six (norms, roll, multiply, multiply-add, index copy).
- `advance_positions`: a batched step's token positions from the per-row lengths on the device, and the lengths
  advanced, one launch instead of about four.
- `gated_activation`: the gated MLP's activation (SiLU, or Gemma's tanh GELU) and product, one launch instead of
  two.

Each computes in float32 and rounds once to the model dtype, so in float32 the results equal the PyTorch path's to
rounding (tests/test_triton_ops.py runs these kernels in Triton's CPU interpreter against it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(inputs, weight, outputs, input_row_stride, output_row_stride, width, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.arange(0, BLOCK)
    inside = columns < width
    values = tl.load(inputs + row * input_row_stride + columns, mask=inside, other=0.0).to(tl.float32)
    # The float arguments are cast: under torch.compile they arrive as float64 scalars.
    scale = tl.rsqrt((tl.sum(values * values, axis=0) / width + eps).to(tl.float32))
    gains = tl.load(weight + columns, mask=inside, other=0.0).to(tl.float32)
    normed = values * scale * gains
    tl.store(outputs + row * output_row_stride + columns, normed.to(outputs.dtype.element_ty), mask=inside)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of `hidden` (rows may be strided; the last dimension must be contiguous)."""
    width = hidden.shape[-1]
    rows = hidden.reshape(-1, width) if hidden.stride(-1) == 1 else hidden.contiguous().view(-1, width)
    out = torch.empty(rows.shape, dtype=hidden.dtype, device=hidden.device)
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, rows.stride(0), out.stride(0), width, eps, BLOCK=block, num_warps=_warps(block)
    )
    return out.view(hidden.shape)


@triton.jit
def _rope_and_store_kernel(
    qkv,
    cos_table,
    sin_table,
    positions,
    sequences,
    cache,
    q_norm,
    k_norm,
    token_stride,
    head_stride,
    cache_half_stride,
    cache_sequence_stride,
    cache_head_stride,
    cache_position_stride,
    table_stride,
    tokens_per_row,
    heads,
    kv_heads,
    half,
    eps,
    HALF_BLOCK: tl.constexpr,
    HAS_QK_NORM: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    offsets = tl.arange(0, HALF_BLOCK)
    inside = offsets < half
    row = qkv + token * token_stride + head * head_stride
    low = tl.load(row + offsets, mask=inside, other=0.0).to(tl.float32)
    high = tl.load(row + half + offsets, mask=inside, other=0.0).to(tl.float32)
    position = tl.load(positions + token)
    sequence_cache = cache + tl.load(sequences + token // tokens_per_row) * cache_sequence_stride
    is_value = head >= heads + kv_heads
    if is_value:
        head_cache = sequence_cache + cache_half_stride + (head - heads - kv_heads) * cache_head_stride
        slot = head_cache + position * cache_position_stride
        tl.store(slot + offsets, low.to(cache.dtype.element_ty), mask=inside)
        tl.store(slot + half + offsets, high.to(cache.dtype.element_ty), mask=inside)
    else:
        if HAS_QK_NORM:
            is_query = head < heads
            gain_low = tl.where(
                is_query,
                tl.load(q_norm + offsets, mask=inside, other=0.0),
                tl.load(k_norm + offsets, mask=inside, other=0.0),
            ).to(tl.float32)
            gain_high = tl.where(
                is_query,
                tl.load(q_norm + half + offsets, mask=inside, other=0.0),
                tl.load(k_norm + half + offsets, mask=inside, other=0.0),
            ).to(tl.float32)
            squares = tl.sum(low * low, axis=0) + tl.sum(high * high, axis=0)
            scale = tl.rsqrt((squares / (2 * half) + eps).to(tl.float32))
            low = low * scale * gain_low
            high = high * scale * gain_high
        angles = position * table_stride
        cos_low = tl.load(cos_table + angles + offsets, mask=inside, other=0.0).to(tl.float32)
        cos_high = tl.load(cos_table + angles + half + offsets, mask=inside, other=0.0).to(tl.float32)
        sin_low = tl.load(sin_table + angles + offsets, mask=inside, other=0.0).to(tl.float32)
        sin_high = tl.load(sin_table + angles + half + offsets, mask=inside, other=0.0).to(tl.float32)
        rotated_low = low * cos_low + high * sin_low
        rotated_high = high * cos_high + low * sin_high
        if head < heads:
            tl.store(row + offsets, rotated_low.to(qkv.dtype.element_ty), mask=inside)
            tl.store(row + half + offsets, rotated_high.to(qkv.dtype.element_ty), mask=inside)
        else:
            slot = sequence_cache + (head - heads) * cache_head_stride + position * cache_position_stride
            tl.store(slot + offsets, rotated_low.to(cache.dtype.element_ty), mask=inside)
            tl.store(slot + half + offsets, rotated_high.to(cache.dtype.element_ty), mask=inside)


def rope_and_store(
    qkv: torch.Tensor,
    cos_table: torch.Tensor,
    signed_sin_table: torch.Tensor,
    positions: torch.Tensor,
    sequences: torch.Tensor,
    layer_cache: torch.Tensor,
    heads: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
) -> None:
    """Rotate the queries of `qkv` (tokens, heads + 2·kv_heads, head_dim) in place and write the rotated keys and
    the values into `layer_cache` (2, sequences, kv_heads, capacity, head_dim) at `positions`, the tokens split
    evenly over the rows of `sequences` (row i's tokens go to cache row `sequences[i]`); with `q_norm`/`k_norm`,
    RMSNorm each query/key head first. `cos_table`/`signed_sin_table` are the cache's (capacity, head_dim) rotary
    tables, the sine's first half negated (see `StaticCache`)."""
    tokens, all_heads, head_dim = qkv.shape
    kv_heads = layer_cache.shape[2]
    half = head_dim // 2
    has_norm = q_norm is not None and k_norm is not None
    _rope_and_store_kernel[(tokens, all_heads)](
        qkv,
        cos_table,
        signed_sin_table,
        positions,
        sequences,
        layer_cache,
        q_norm if has_norm else qkv,
        k_norm if has_norm else qkv,
        qkv.stride(0),
        qkv.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        cos_table.stride(0),
        tokens // sequences.shape[0],
        heads,
        kv_heads,
        half,
        eps,
        HALF_BLOCK=triton.next_power_of_2(half),
        HAS_QK_NORM=has_norm,
        num_warps=1,
    )


@triton.jit
def _tanh(x):
    """tanh spelled with exp (Triton's CPU interpreter has no tanh), clamped so that exp cannot overflow: tanh(40)
    is 1 in float32."""
    return 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * x, 80.0)) + 1.0)


@triton.jit
def _advance_positions_kernel(lengths, inputs, positions, bucket, width, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    sequence = tl.load(inputs + row)
    start = tl.load(lengths + sequence)
    offsets = tl.arange(0, BLOCK)
    tl.store(positions + row * width + offsets, start + offsets, mask=offsets < width)
    # Rows name distinct cache rows, except padding rows, which share the scratch row and advance it by 0.
    tl.store(lengths + sequence, start + tl.load(inputs + bucket + row))


def advance_positions(lengths: torch.Tensor, inputs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`speculor.runners.fast.advance_positions` in one launch instead of about four (a step's positions from the
    device lengths, and the lengths advanced); only the length of `offsets` (0..width-1) is used."""
    bucket, width = inputs.shape[0] // 2, offsets.shape[0]
    positions = torch.empty(bucket * width, dtype=lengths.dtype, device=lengths.device)
    block = max(16, triton.next_power_of_2(width))
    _advance_positions_kernel[(bucket,)](lengths, inputs, positions, bucket, width, BLOCK=block, num_warps=1)
    return positions


# The gated MLP activations the fused kernel knows, by the config's `hidden_act` name.
GATED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@triton.jit
def _gated_activation_kernel(gate_up, out, width, row_stride, BLOCK: tl.constexpr, GELU_TANH: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    gate = tl.load(gate_up + row * row_stride + columns, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * row_stride + width + columns, mask=inside, other=0.0).to(tl.float32)
    if GELU_TANH:  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        activated = 0.5 * gate * (1.0 + _tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
    else:
        activated = gate * tl.sigmoid(gate)
    tl.store(out + row * width + columns, (activated * up).to(out.dtype.element_ty), mask=inside)


def gated_activation(gate_up: torch.Tensor, width: int, activation: str) -> torch.Tensor:
    """act(gate) · up for `gate_up` (tokens, 2·width) holding gate then up, as the gated MLPs compute it;
    `activation` is a key of GATED_ACTIVATIONS (SiLU for Llama and Qwen, tanh-approximated GELU for Gemma)."""
    tokens = gate_up.shape[0]
    out = torch.empty((tokens, width), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(width))
    grid = (tokens, triton.cdiv(width, block))
    gelu_tanh = GATED_ACTIVATIONS[activation] == "gelu_tanh"
    _gated_activation_kernel[grid](
        gate_up, out, width, gate_up.stride(0), BLOCK=block, GELU_TANH=gelu_tanh, num_warps=_warps(block)
    )
    return out


def _warps(block: int) -> int:
    """Enough warps that each thread holds a few elements of a `block`-wide row."""
    return max(1, min(16, block // 256))


# The decode attention handles steps whose folded query rows per sequence (query heads per key/value head × tokens
# per sequence) fit one tile; a longer step (a prefill) uses PyTorch's scaled_dot_product_attention instead.
ATTENTION_MAX_ROWS = 128
_KEYS_PER_TILE = 64
# Programs to aim for: at small batches each sequence's key range is split over several programs (flash-decoding)
# so that the GPU is occupied; at large batches the sequences alone occupy it and one split needs no combine.
_TARGET_PROGRAMS = 128
_LOG2_E = 1.4426950408889634


@triton.jit
def _attention_kernel(
    query,
    cache,
    positions,
    sequences,
    out,
    partial_out,
    partial_lse,
    tokens_per_row,
    group,
    query_rows,
    head_dim,
    splits,
    query_token_stride,
    cache_half_stride,
    cache_sequence_stride,
    cache_head_stride,
    cache_position_stride,
    scale_log2,
    softcap_scale,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOWED: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    sequence_row = tl.program_id(2)
    kv_heads = tl.num_programs(0)
    row = tl.arange(0, BLOCK_M)
    dim = tl.arange(0, BLOCK_D)
    row_inside = row < query_rows
    dim_inside = dim < head_dim
    token = sequence_row * tokens_per_row + row % tokens_per_row
    head = kv_head * group + row // tokens_per_row
    query_tile = tl.load(
        query + token[:, None] * query_token_stride + head[:, None] * head_dim + dim[None, :],
        mask=row_inside[:, None] & dim_inside[None, :],
        other=0.0,
    )
    last_key = tl.load(positions + token, mask=row_inside, other=-1)
    # This sequence's own length (its last token's position + 1) bounds the keys read, whatever the cache holds.
    row_length = tl.load(positions + sequence_row * tokens_per_row + tokens_per_row - 1) + 1
    keys = cache + tl.load(sequences + sequence_row) * cache_sequence_stride + kv_head * cache_head_stride
    values = keys + cache_half_stride
    running_max = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    accumulated = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # The sequence's tiles are spread evenly over the splits; trailing splits of a short sequence get none. With a
    # sliding window, tiles wholly before the first query's window are skipped.
    tiles = tl.cdiv(row_length, BLOCK_N)
    first_tile = 0
    if WINDOWED:
        first_position = tl.load(positions + sequence_row * tokens_per_row)
        first_tile = tl.maximum(first_position - window + 1, 0) // BLOCK_N
    tiles_per_split = tl.cdiv(tiles - first_tile, splits)
    # A while loop, not `for … in range(…)`: Triton's CPU interpreter cannot take a runtime bound in range() under
    # NumPy ≥ 2.4, and a split holds only a few tiles, so software pipelining gains little here.
    tile = first_tile + split * tiles_per_split
    last_tile = tl.minimum(tile + tiles_per_split, tiles)
    while tile < last_tile:
        slot = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        slot_inside = slot < row_length
        key_tile = tl.load(
            keys + slot[None, :] * cache_position_stride + dim[:, None],
            mask=dim_inside[:, None] & slot_inside[None, :],
            other=0.0,
        )
        scores = tl.dot(query_tile, key_tile, input_precision="ieee") if IEEE else tl.dot(query_tile, key_tile)
        allowed = slot[None, :] <= last_key[:, None]
        if WINDOWED:
            allowed = allowed & (slot[None, :] > last_key[:, None] - window)
        if SOFTCAP:  # cap · tanh(score / cap); the cap multiplies in through scale_log2
            scores = _tanh(scores * softcap_scale)
        scores = tl.where(allowed, (scores * scale_log2).to(tl.float32), -1.0e30)
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        weights = tl.where(allowed, tl.exp2(scores - new_max[:, None]), 0.0)
        correction = tl.exp2(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        value_tile = tl.load(
            values + slot[:, None] * cache_position_stride + dim[None, :],
            mask=slot_inside[:, None] & dim_inside[None, :],
            other=0.0,
        )
        if IEEE:
            update = tl.dot(weights, value_tile, input_precision="ieee")
        else:
            update = tl.dot(weights.to(value_tile.dtype), value_tile)
        accumulated = accumulated * correction[:, None] + update
        running_max = new_max
        tile += 1
    safe_sum = tl.maximum(running_sum, 1.0e-30)  # zero only in padding rows and splits wholly past a position
    if SINGLE_SPLIT:
        result = accumulated / safe_sum[:, None]
        tl.store(
            out + token[:, None] * (kv_heads * group * head_dim) + head[:, None] * head_dim + dim[None, :],
            result.to(out.dtype.element_ty),
            mask=row_inside[:, None] & dim_inside[None, :],
        )
    else:
        base = ((sequence_row * splits + split) * kv_heads + kv_head) * BLOCK_M
        tl.store(partial_out + (base + row[:, None]) * BLOCK_D + dim[None, :], accumulated / safe_sum[:, None])
        tl.store(partial_lse + base + row, running_max + tl.log2(safe_sum))


@triton.jit
def _combine_splits_kernel(
    partial_out,
    partial_lse,
    out,
    tokens_per_row,
    group,
    head_dim,
    splits,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    kv_head = tl.program_id(0)
    row = tl.program_id(1)
    sequence_row = tl.program_id(2)
    kv_heads = tl.num_programs(0)
    split = tl.arange(0, BLOCK_S)
    dim = tl.arange(0, BLOCK_D)
    split_inside = split < splits
    base = ((sequence_row * splits + split) * kv_heads + kv_head) * BLOCK_M + row
    lse = tl.load(partial_lse + base, mask=split_inside, other=-1.0e30)
    weights = tl.where(split_inside, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
    parts = tl.load(partial_out + base[:, None] * BLOCK_D + dim[None, :], mask=split_inside[:, None], other=0.0)
    result = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    token = sequence_row * tokens_per_row + row % tokens_per_row
    head = kv_head * group + row // tokens_per_row
    tl.store(
        out + token * (kv_heads * group * head_dim) + head * head_dim + dim,
        result.to(out.dtype.element_ty),
        mask=dim < head_dim,
    )


def attention(
    query: torch.Tensor,
    layer_cache: torch.Tensor,
    positions: torch.Tensor,
    sequences: torch.Tensor,
    scaling: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of a step's queries (rows·k, heads, head_dim), k tokens per row, each row over its own
    cache row `sequences[i]` of `layer_cache` (2, sequences, kv_heads, capacity, head_dim), each query seeing the
    positions up to its own; returns (rows·k, heads·head_dim).

    The cache is read in place through `sequences` (no gathered copy) and only up to each row's own length, read
    on the device from `positions`, so one launch shape serves every length and batch composition: the grid depends
    only on the number of rows, k and the cache's capacity, which keeps it fixed for graph capture. Grouped-query
    heads are folded into their key/value head's query rows, so each cached key is read once per step; at small
    batches each row's keys are split over several programs whose partial results a second kernel combines
    (flash-decoding). A sliding `window` masks keys more than `window - 1` positions before a query (and skips
    the tiles no query of the row sees); a `softcap` soft-caps the scaled scores (cap · tanh(score / cap), Gemma 2).
    Needs `group · k` ≤ ATTENTION_MAX_ROWS.
    """
    tokens, heads, head_dim = query.shape
    kv_heads, capacity = layer_cache.shape[2], layer_cache.shape[3]
    rows = sequences.shape[0]
    tokens_per_row = tokens // rows
    group = heads // kv_heads
    query_rows = group * tokens_per_row
    block_m = max(16, triton.next_power_of_2(query_rows))
    block_d = max(16, triton.next_power_of_2(head_dim))
    splits = max(1, min(triton.cdiv(capacity, _KEYS_PER_TILE), _TARGET_PROGRAMS // (kv_heads * rows)))
    out = torch.empty((tokens, heads * head_dim), dtype=query.dtype, device=query.device)
    if splits > 1:
        partial_shape = (rows, splits, kv_heads, block_m)
        partial_out = torch.empty((*partial_shape, block_d), dtype=torch.float32, device=query.device)
        partial_lse = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
    else:  # one split writes `out` directly; the partial buffers are never touched
        partial_out = partial_lse = out
    _attention_kernel[(kv_heads, splits, rows)](
        query,
        layer_cache,
        positions,
        sequences,
        out,
        partial_out,
        partial_lse,
        tokens_per_row,
        group,
        query_rows,
        head_dim,
        splits,
        query.stride(0),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        (softcap if softcap is not None else scaling) * _LOG2_E,
        scaling / softcap if softcap is not None else 1.0,
        window or 0,
        BLOCK_M=block_m,
        BLOCK_N=_KEYS_PER_TILE,
        BLOCK_D=block_d,
        SINGLE_SPLIT=splits == 1,
        IEEE=query.dtype == torch.float32,
        SOFTCAP=softcap is not None,
        WINDOWED=window is not None,
        num_warps=4,
    )
    if splits > 1:
        _combine_splits_kernel[(kv_heads, query_rows, rows)](
            partial_out,
            partial_lse,
            out,
            tokens_per_row,
            group,
            head_dim,
            splits,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(splits),
            num_warps=1,
        )
    return out
