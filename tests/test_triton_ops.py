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


def rotate_and_store_reference(qkv, cos, signed_sin, positions, layer_cache, heads, q_norm, k_norm):
    tokens, _, head_dim = qkv.shape
    kv_heads = layer_cache.shape[1]
    if q_norm is not None:
        qkv[:, :heads] = F.rms_norm(qkv[:, :heads], (head_dim,), q_norm, EPS)
        qkv[:, heads : heads + kv_heads] = F.rms_norm(qkv[:, heads : heads + kv_heads], (head_dim,), k_norm, EPS)
    llama.rotate_in_place(qkv[:, : heads + kv_heads], cos[positions][:, None], signed_sin[positions][:, None])
    layer_cache.index_copy_(2, positions, qkv[:, heads:].view(tokens, 2, kv_heads, head_dim).permute(1, 2, 0, 3))


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
    generator = torch.Generator().manual_seed(head_dim + with_norm)
    tokens, heads, kv_heads, capacity = 3, 4, 2, 32
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=generator).to(DEVICE)
    cos, signed_sin = (torch.randn(capacity, head_dim, generator=generator).to(DEVICE) for _ in range(2))
    positions = torch.tensor([9, 10, 11], device=DEVICE)
    cache = torch.randn(2, kv_heads, capacity, head_dim, generator=generator).to(DEVICE)
    norms = [torch.randn(head_dim, generator=generator).to(DEVICE) for _ in range(2)] if with_norm else [None, None]
    expected_qkv, expected_cache = qkv.clone(), cache.clone()
    rotate_and_store_reference(expected_qkv, cos, signed_sin, positions, expected_cache, heads, *norms)
    triton_ops.rope_and_store(qkv, cos, signed_sin, positions, cache, heads, *norms, EPS)
    torch.testing.assert_close(qkv[:, :heads], expected_qkv[:, :heads], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, expected_cache, rtol=1e-5, atol=1e-5)


def test_silu_and_multiply_matches_torch():
    gate_up = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    expected = F.silu(gate_up[:, :1500]) * gate_up[:, 1500:]
    torch.testing.assert_close(triton_ops.silu_and_multiply(gate_up, 1500), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_fused_forward_matches_plain_forward(architecture):
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture]().eval().to(DEVICE)
    weights = llama.LlamaWeights.from_model(model)
    caches = {name: llama.StaticCache.allocate(weights, 64) for name in ("plain", "fused")}
    prompt = torch.randint(0, weights.vocab_size, (12,)).to(DEVICE)
    step = torch.randint(0, weights.vocab_size, (3,)).to(DEVICE)

    def run(name, tokens, start, with_logits):
        positions = torch.arange(start, start + tokens.numel(), device=DEVICE)
        kernels = triton_ops if name == "fused" else None
        with torch.inference_mode():
            return llama.forward_tokens(weights, caches[name], tokens, positions, 64, with_logits, kernels)

    for name in caches:
        run(name, prompt, 0, False)
    # A step at 12, then (rolled back) another over the same slots: the fused write must replace the stale keys.
    outputs = {name: [run(name, step.flip(0), 12, True), run(name, step, 12, True)] for name in caches}
    for fused, plain in zip(outputs["fused"], outputs["plain"], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches["fused"].kv[..., :15, :], caches["plain"].kv[..., :15, :])


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


@pytest.mark.parametrize(("tokens", "span", "programs"), [(1, 64, 128), (4, 128, 128), (5, 320, 128), (3, 320, 4)])
def test_attention_matches_sdpa(monkeypatch, tokens, span, programs):
    """One split (span 64), several one-tile splits combined (128, 320) and splits of several tiles (320 keys over
    at most 4 programs); the positions leave stale slots inside the span, which must stay masked."""
    monkeypatch.setattr(triton_ops, "_TARGET_PROGRAMS", programs)
    generator = torch.Generator().manual_seed(tokens)
    heads, kv_heads, head_dim, capacity = 4, 2, 24, span + 16
    cache = torch.randn(2, kv_heads, capacity, head_dim, generator=generator).to(DEVICE)
    query = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=generator).to(DEVICE)[:, :heads]
    positions = torch.arange(span - 40, span - 40 + tokens, device=DEVICE)
    slots = torch.arange(capacity, device=DEVICE)
    mask = llama.causal_mask(llama.StaticCache(cache, cache, cache, slots), positions, span, 2, cache.dtype)
    expected = llama.attend(query, cache[0, :, :span], cache[1, :, :span], mask, 0.3)
    actual = triton_ops.attention(query, cache, positions, span, 0.3)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
