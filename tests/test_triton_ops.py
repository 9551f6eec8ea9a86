"""The fast runner's fused Triton kernels against the PyTorch operations they replace: each kernel alone, and whole
forward steps (prefill, then steps after a rollback) for each supported architecture. Without a GPU they run in
Triton's CPU interpreter (tests/conftest.py turns it on); on a GPU the same kernel code is compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fast_runner import ARCHITECTURES
from transformers import GPT2Config, GPT2LMHeadModel

from speculor.api import SpeculativeDecoder
from speculor.errors import SpeculorError
from speculor.runners import FastRunner, fast, llama, make_runner

triton_ops = pytest.importorskip("speculor.runners.triton_ops", reason="Triton is not installed")

EPS = 1e-6
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rotate_and_store_reference(qkv, cos, signed_sin, positions, sequences, layer_cache, heads, q_norm, k_norm):
    tokens, _, head_dim = qkv.shape
    kv_heads = layer_cache.shape[2]
    if q_norm is not None:
        qkv[:, :heads] = F.rms_norm(qkv[:, :heads], (head_dim,), q_norm, EPS)
        qkv[:, heads : heads + kv_heads] = F.rms_norm(qkv[:, heads : heads + kv_heads], (head_dim,), k_norm, EPS)
    llama.rotate_in_place(qkv[:, : heads + kv_heads], cos[positions][:, None], signed_sin[positions][:, None])
    token_rows = sequences.repeat_interleave(tokens // sequences.numel())
    layer_cache[:, token_rows, :, positions] = qkv[:, heads:].view(tokens, 2, kv_heads, head_dim)


@pytest.mark.parametrize("width", [96, 128, 200])
def test_rms_norm_matches_torch(width):
    generator = torch.Generator().manual_seed(width)
    hidden = torch.randn(5, 2 * width, generator=generator).to(DEVICE)[:, :width]
    weight = torch.randn(width, generator=generator).to(DEVICE)
    expected = F.rms_norm(hidden, (width,), weight, EPS)
    torch.testing.assert_close(triton_ops.rms_norm(hidden, weight, EPS), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_dim", [16, 24])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rope_and_store_matches_torch(head_dim, with_norm):
    """Two rows of three tokens each, written to cache rows 2 and 0 at their own positions."""
    generator = torch.Generator().manual_seed(head_dim + with_norm)
    tokens, heads, kv_heads, capacity = 6, 4, 2, 32
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=generator).to(DEVICE)
    cos, signed_sin = (torch.randn(capacity, head_dim, generator=generator).to(DEVICE) for _ in range(2))
    positions = torch.tensor([9, 10, 11, 0, 1, 2], device=DEVICE)
    sequences = torch.tensor([2, 0], device=DEVICE)
    cache = torch.randn(2, 3, kv_heads, capacity, head_dim, generator=generator).to(DEVICE)
    norms = [torch.randn(head_dim, generator=generator).to(DEVICE) for _ in range(2)] if with_norm else [None, None]
    expected_qkv, expected_cache = qkv.clone(), cache.clone()
    rotate_and_store_reference(expected_qkv, cos, signed_sin, positions, sequences, expected_cache, heads, *norms)
    triton_ops.rope_and_store(qkv, cos, signed_sin, positions, sequences, cache, heads, *norms, EPS)
    torch.testing.assert_close(qkv[:, :heads], expected_qkv[:, :heads], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, expected_cache, rtol=1e-5, atol=1e-5)


def test_advance_positions_matches_torch():
    """Rows 2 and 0 step 3 tokens; two padding rows share the scratch row 3, whose length stays 0."""
    expected_lengths = torch.tensor([5, 0, 9, 0], device=DEVICE)
    actual_lengths = expected_lengths.clone()
    inputs = torch.tensor([2, 0, 3, 3, 3, 3, 0, 0], device=DEVICE)
    offsets = torch.arange(3, device=DEVICE)
    expected = fast.advance_positions(expected_lengths, inputs, offsets)
    torch.testing.assert_close(triton_ops.advance_positions(actual_lengths, inputs, offsets), expected)
    assert expected.tolist() == [9, 10, 11, 5, 6, 7, 0, 1, 2, 0, 1, 2]
    assert actual_lengths.tolist() == expected_lengths.tolist() == [8, 0, 12, 0]


@pytest.mark.parametrize(
    ("activation", "function"),
    [("silu", F.silu), ("gelu_pytorch_tanh", lambda gate: F.gelu(gate, approximate="tanh"))],
)
def test_gated_activation_matches_torch(activation, function):
    gate_up = 3 * torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    expected = function(gate_up[:, :1500]) * gate_up[:, 1500:]
    actual = triton_ops.gated_activation(gate_up, 1500, activation)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# Between them: biases and tied embeddings, q/k norms, soft-capping, sliding and global layers, Gemma's norms and
# two rotary tables (each architecture costs seconds in the interpreter).
@pytest.mark.parametrize("architecture", ["llama-linear-rope-biases-tied", "qwen3", "gemma2", "gemma3"])
def test_fused_forward_matches_plain_forward(architecture):
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().eval().to(DEVICE)
    weights = llama.LlamaWeights.from_model(model)
    caches = {name: llama.StaticCache.allocate(weights, 3, 64) for name in ("plain", "fused")}
    prompts = {0: torch.randint(0, weights.vocab_size, (12,)).to(DEVICE), 2: torch.randint(0, 50, (5,)).to(DEVICE)}
    step = torch.randint(0, weights.vocab_size, (2, 3)).to(DEVICE)
    sequences = torch.tensor([2, 0], device=DEVICE)
    positions = torch.tensor([5, 6, 7, 12, 13, 14], device=DEVICE)

    def run(name, tokens, positions, sequences, with_logits):
        kernels = triton_ops if name == "fused" else None
        with torch.inference_mode():
            return llama.forward_tokens(weights, caches[name], tokens, positions, sequences, 64, with_logits, kernels)

    for name in caches:
        for slot, prompt in prompts.items():
            run(name, prompt, torch.arange(prompt.numel(), device=DEVICE), [slot], False)
    # A batched step over rows 2 and 0 (lengths 5 and 12), then (rolled back) another over the same positions: the
    # fused write must replace the stale keys.
    outputs = {
        name: [run(name, tokens.reshape(-1), positions, sequences, True) for tokens in (step.flip(1), step)]
        for name in caches
    }
    for fused, plain in zip(outputs["fused"], outputs["plain"], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches["fused"].kv[:, :, 0, :, :15], caches["plain"].kv[:, :, 0, :, :15])
    torch.testing.assert_close(caches["fused"].kv[:, :, 2, :, :8], caches["plain"].kv[:, :, 2, :, :8])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_kernel_choice_is_checked():
    model = ARCHITECTURES["llama"]()
    assert FastRunner(model).fused is None
    assert fast.fused_kernels("auto", torch.device("cpu")) is None
    with pytest.raises(SpeculorError, match="needs a CUDA device"):
        FastRunner(model, kernels="triton")
    with pytest.raises(SpeculorError, match="unknown kernels 'cuda'"):
        FastRunner(model, kernels="cuda")
    with pytest.raises(SpeculorError, match="unknown kernels 'fused'"):
        SpeculativeDecoder(model, kernels="fused")
    with pytest.raises(SpeculorError, match="kernels='triton' needs the fast runner"):
        make_runner(model, "hf", kernels="triton")
    with pytest.raises(SpeculorError, match="kernels='triton' needs the fast runner, which cannot run this model"):
        make_runner(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)), kernels="triton")
    assert make_runner(model, kernels="torch").fused is None


@pytest.mark.parametrize(
    ("lengths", "tokens", "programs", "window", "softcap"),
    [
        ((64,), 1, 128, None, None),
        ((120,), 4, 128, None, None),
        ((300, 7, 130), 5, 128, None, None),
        ((300, 70), 2, 16, None, None),
        ((300, 70), 3, 4, None, None),
        ((300, 7, 130), 3, 128, 70, None),
        ((300, 90), 4, 4, 70, 0.7),
        ((40,), 2, 128, None, 0.7),
    ],
)
def test_attention_matches_sdpa(monkeypatch, lengths, tokens, programs, window, softcap):
    """Rows of different lengths, each reading its own cache row (listed out of order) up to its own length: one
    row in one split (64 keys) or several one-tile splits (120), three rows whose splits hold up to one tile each
    and trailing splits with none (a row of 7 keys), splits of several tiles combined (16 programs: 4 splits), and
    one split of every tile (4 programs). Stale cache positions past each row's last position must stay masked.
    Then sliding windows of 70 keys (the first tiles of a 300-key row skipped, a 7-key row inside its window) and
    soft-capped scores (Gemma 2)."""
    monkeypatch.setattr(triton_ops, "_TARGET_PROGRAMS", programs)
    generator = torch.Generator().manual_seed(tokens)
    rows, heads, kv_heads, head_dim, capacity = len(lengths), 4, 2, 24, 320
    cache = torch.randn(2, rows + 1, kv_heads, capacity, head_dim, generator=generator).to(DEVICE)
    query = torch.randn(rows * tokens, heads + 2 * kv_heads, head_dim, generator=generator).to(DEVICE)[:, :heads]
    sequences = torch.arange(rows, 0, -1, device=DEVICE)
    positions = torch.cat([torch.arange(length - tokens, length) for length in lengths]).to(DEVICE)
    slots = torch.arange(capacity, device=DEVICE)
    static = llama.StaticCache(cache, cache, cache, slots)
    mask = llama.causal_mask(static, positions, rows, capacity, 2, cache.dtype, window)
    gathered = cache[:, sequences]
    expected = llama.attend(query, gathered[0], gathered[1], mask, 0.3, softcap)
    actual = triton_ops.attention(query, cache, positions, sequences, 0.3, window, softcap)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_the_captured_step_matches_the_eager_step(fused):
    """The code a CUDA graph captures (`FastRunner._static_step`: positions from the lengths kept on the device, which
    it then advances; rows padded on the scratch row), run eagerly here — with PyTorch's operations, and with the
    fused kernels (the interpreter on a CPU) — against the eager step, which takes positions from the host."""
    torch.manual_seed(0)
    model = ARCHITECTURES["gemma3"]().eval().to(DEVICE)
    eager, static = (FastRunner(model, slots=5, capture="eager", kernels="torch") for _ in range(2))
    static.fused = triton_ops if fused else None
    for slot, length in ((0, 10), (1, 4), (2, 20)):
        prompt = torch.randint(0, static.vocab_size, (length,)).to(DEVICE)
        eager.extend(slot, prompt)
        static.extend(slot, prompt)
    static._device_lengths.copy_(torch.tensor([10, 4, 20, 0, 0, 0]))
    tokens = torch.randint(0, static.vocab_size, (4, 2)).to(DEVICE)
    inputs = torch.tensor([2, 0, 1, static._scratch_row, 2, 2, 2, 0], device=DEVICE)  # three rows and one padding
    with torch.inference_mode():
        logits = static._static_step(tokens, inputs, None, None).view(4, 2, -1)[:3]
    torch.testing.assert_close(logits, eager.step([2, 0, 1], tokens[:3]), rtol=1e-4, atol=1e-4)
    assert static._device_lengths.tolist() == [12, 6, 22, 0, 0, 0]
