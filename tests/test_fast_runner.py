"""The fast runner against transformers: same logits (float32, tiny random models of each supported architecture),
same greedy speculative output, and clear behaviour for architectures it does not support."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from speculor.api import SpeculativeDecoder
from speculor.errors import SpeculorError
from speculor.runners import FastRunner, HFRunner, make_runner

VOCAB = 97
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
    "llama3-rope": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE)),
    "llama-linear-rope-biases-tied": lambda: LlamaForCausalLM(
        LlamaConfig(
            **SHAPE,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        )
    ),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=24)),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]().eval()
    # Random biases and norm weights, so that a forgotten bias or norm cannot hide behind zeros and ones.
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("bias") or "norm" in parameter_name:
                parameter.normal_(mean=1.0 if "norm" in parameter_name else 0.0, std=0.2)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_match_transformers_through_steps_and_rollbacks(name: str) -> None:
    model = build(name)
    fast, reference = FastRunner(model), HFRunner(model)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (150,), generator=generator)  # crosses the first 128-slot attention span
    fast.prefill(prompt)
    reference.prefill(prompt)
    # (tokens fed, cache length to roll back to afterwards): verify-sized and decode-sized steps.
    for count, keep in [(5, 152), (1, None), (3, 154), (8, 155), (2, None), (1, 150)]:
        tokens = torch.randint(0, VOCAB, (count,), generator=generator)
        expected, actual = reference.forward(tokens), fast.forward(tokens)
        assert actual.dtype == torch.float32
        assert actual.shape == (count, VOCAB)
        assert relative_error(actual, expected) <= 1e-4
        assert fast.cache_length == reference.cache_length
        if keep is not None:
            fast.truncate(keep)
            reference.truncate(keep)


@pytest.mark.parametrize("name", ["llama3-rope", "qwen2", "qwen3"])
def test_greedy_speculative_output_is_identical_across_runners(name: str) -> None:
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]
    outputs = {}
    for runner in ("fast", "hf"):
        decoder = SpeculativeDecoder(build(name, seed=0), build(name, seed=1), device="cpu", runner=runner)
        for speculative in (True, False):
            result = decoder.generate(prompt, max_new_tokens=40, gamma=3, ignore_eos=True, speculative=speculative)
            outputs[runner, speculative] = result.token_ids
    assert len(outputs["hf", False]) == 40
    assert outputs["fast", True] == outputs["hf", True] == outputs["fast", False] == outputs["hf", False]


def test_fusing_projections_keeps_one_copy_and_the_model_unchanged() -> None:
    model = build("qwen2")
    prompt = torch.arange(12).view(1, -1)
    before = model(input_ids=prompt).logits
    first, second = FastRunner(model), FastRunner(model)
    assert torch.equal(model(input_ids=prompt).logits, before)
    fused = first.weights.layers[0].qkv
    assert second.weights.layers[0].qkv.data_ptr() == fused.data_ptr()
    assert model.model.layers[0].self_attn.k_proj.weight.data_ptr() > fused.data_ptr()
    assert model.model.layers[0].self_attn.k_proj.weight.untyped_storage().data_ptr() == fused.data_ptr()


def test_runner_kinds_pick_fast_for_llama_and_hf_on_request() -> None:
    model = build("llama")
    assert isinstance(make_runner(model, "auto"), FastRunner)
    assert isinstance(make_runner(model, "fast"), FastRunner)
    assert isinstance(make_runner(model, "hf"), HFRunner)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()


def test_auto_falls_back_to_hf_for_gpt2_with_a_notice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="speculor.runners"):
        runner = make_runner(tiny_gpt2(), "auto")
    assert isinstance(runner, HFRunner)
    assert "'gpt2' is not one of" in caplog.text


def test_fast_on_gpt2_names_the_reason() -> None:
    with pytest.raises(SpeculorError, match="fast runner cannot run GPT2LMHeadModel: architecture 'gpt2'"):
        make_runner(tiny_gpt2(), "fast")


def test_sliding_window_in_use_is_unsupported() -> None:
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=16)).eval()
    with pytest.raises(SpeculorError, match="sliding window of 16 tokens is in use"):
        make_runner(model, "fast")
    assert isinstance(make_runner(model, "auto"), HFRunner)


def test_window_no_shorter_than_the_cache_is_not_in_use() -> None:
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=4096)).eval()
    assert isinstance(make_runner(model, "auto"), FastRunner)


def test_cache_cap_bounds_max_length_and_overflow_is_a_clear_error() -> None:
    runner = FastRunner(build("llama"), max_cache_length=16)
    assert runner.max_length == 16
    runner.prefill(torch.arange(12))
    runner.forward(torch.arange(4))
    with pytest.raises(SpeculorError, match="cache holds 16 tokens; 16 \\+ 1 do not fit"):
        runner.forward(torch.arange(1))
    runner.truncate(10)
    assert runner.cache_length == 10
    assert runner.forward(torch.arange(6)).shape == (6, VOCAB)


def test_graph_capture_needs_cuda() -> None:
    with pytest.raises(SpeculorError, match="needs a CUDA device"):
        FastRunner(build("llama"), capture="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("capture", ["graph", "compile"])
def test_captured_steps_match_eager_on_cuda(capture: str) -> None:
    model = build("qwen3").cuda()
    captured, eager = FastRunner(model, capture=capture), FastRunner(model, capture="eager")
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, VOCAB, (20,), generator=generator).cuda()
    captured.prefill(prompt)
    eager.prefill(prompt)
    for count, keep in [(4, 21), (1, None), (4, 22), (4, None), (2, 23)]:
        tokens = torch.randint(0, VOCAB, (count,), generator=generator).cuda()
        assert relative_error(captured.forward(tokens), eager.forward(tokens)) <= 1e-5
        if keep is not None:
            captured.truncate(keep)
            eager.truncate(keep)
    assert captured.graph_count == (3 if capture == "graph" else 0)


def test_fixed_width_makes_a_verified_token_bitwise_equal_to_decoding_it_alone() -> None:
    model = build("qwen3")
    batched, alone = FastRunner(model, fixed_width=4), FastRunner(model, fixed_width=4)
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (30,), generator=generator)
    tokens = torch.randint(0, VOCAB, (3,), generator=generator)
    batched.prefill(prompt)
    alone.prefill(prompt)
    verified = batched.forward(tokens)
    decoded = torch.cat([alone.forward(tokens[index : index + 1]) for index in range(3)])
    assert torch.equal(verified, decoded)
    assert relative_error(verified, HFRunner(model).forward(torch.cat([prompt, tokens]))[-3:]) <= 1e-4
    with pytest.raises(SpeculorError, match="at most fixed_width=4 tokens, got 5"):
        batched.forward(torch.arange(5))
