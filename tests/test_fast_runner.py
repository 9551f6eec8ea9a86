"""The fast runner against transformers: same logits (float32, tiny random models of each supported architecture),
same greedy speculative output, and clear behaviour for architectures it does not support."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
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

from speculor import runners
from speculor.api import SpeculativeDecoder
from speculor.errors import SpeculorError
from speculor.runners import FastRunner, HFRunner, make_runner

VOCAB = 97
WINDOW = 8
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
    # Windows short enough to mask inside every test's sequences (the fused-kernel test's are 15 tokens long).
    "mistral-window": lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=WINDOW)),
    "qwen2-window-on-layer-1": lambda: Qwen2ForCausalLM(
        Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    ),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**SHAPE, head_dim=16)),
    # Small caps, so that soft-capping changes the random model's scores and logits.
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(
            **SHAPE,
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=0.3,
        )
    ),
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **SHAPE,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=20,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
        )
    ),
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


def reference_logits(model: torch.nn.Module, sequence: list[int], count: int) -> torch.Tensor:
    """transformers' logits for the last `count` tokens of `sequence`, from one forward over all of it (no cache)."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([sequence])).logits[0, -count:]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_match_transformers_through_steps_and_rollbacks(name: str) -> None:
    model = build(name)
    fast = FastRunner(model)
    generator = torch.Generator().manual_seed(1)
    sequence = torch.randint(0, VOCAB, (150,), generator=generator).tolist()  # crosses the first 128-position span
    fast.extend(0, torch.tensor(sequence))
    # (tokens fed, cache length to roll back to afterwards): verify-sized and decode-sized steps.
    for count, keep in [(5, 152), (1, None), (3, 154), (8, 155), (2, None), (1, 150)]:
        tokens = torch.randint(0, VOCAB, (count,), generator=generator)
        actual = fast.step([0], tokens.view(1, -1))
        sequence += tokens.tolist()
        assert actual.dtype == torch.float32
        assert actual.shape == (1, count, VOCAB)
        assert relative_error(actual[0], reference_logits(model, sequence, count)) <= 1e-4
        assert fast.length(0) == len(sequence)
        if keep is not None:
            fast.rollback(0, keep)
            del sequence[keep:]


def float64_model(name: str) -> torch.nn.Module:
    return build(name).double()


@pytest.mark.parametrize("name", ["llama3-rope", "qwen3", "gemma3"])
def test_a_batched_step_equals_each_row_run_alone(name: str) -> None:
    """Rows of different lengths, listed out of slot order, three rows padded to a bucket of four; then per-row
    rollbacks and a step over another set of rows. Float64, so batched and alone must agree to rounding."""
    model = float64_model(name)
    batched = FastRunner(model, slots=5)
    assert batched.buckets == (1, 2, 4, 5)
    generator = torch.Generator().manual_seed(4)
    sequences = {
        slot: torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        for slot, length in ((0, 140), (1, 9), (2, 30), (3, 17), (4, 1))
    }
    for slot, sequence in sequences.items():
        batched.extend(slot, torch.tensor(sequence))
    untouched = batched.cache.kv[:, :, 2, :, :30].clone()
    plan = [([4, 0, 3], 3, {4: 2, 0: 141, 3: 18}), ([0, 3, 4, 1], 2, {}), ([1], 4, {1: 10}), ([3, 1], 1, {})]
    for rows, count, rollbacks in plan:
        tokens = torch.randint(0, VOCAB, (len(rows), count), generator=generator)
        logits = batched.step(rows, tokens)
        assert logits.shape == (len(rows), count, VOCAB)
        for row, slot in enumerate(rows):
            alone = FastRunner(model)
            alone.extend(0, torch.tensor(sequences[slot]))
            assert relative_error(logits[row], alone.step([0], tokens[row : row + 1])[0]) <= 1e-12
            sequences[slot] += tokens[row].tolist()
            assert relative_error(logits[row], reference_logits(model, sequences[slot], count)) <= 1e-6
            assert batched.length(slot) == len(sequences[slot])
        for slot, length in rollbacks.items():
            batched.rollback(slot, length)
            del sequences[slot][length:]
    assert torch.equal(batched.cache.kv[:, :, 2, :, :30], untouched)
    assert batched.length(2) == 30


def test_batched_greedy_decoding_equals_transformers_generate_per_prompt() -> None:
    """A plain AR loop of one-token steps over three rows, each row's argmax fed back; then a slot is reset and
    reused for a new prompt."""
    model = float64_model("qwen2")
    runner = FastRunner(model, slots=3)
    prompts = {0: [5, 17, 33, 2, 90, 41, 8], 1: [60, 1, 1, 70], 2: list(range(20, 45))}

    def decode(slots: list[int], new_tokens: int) -> dict[int, list[int]]:
        outputs = {slot: [] for slot in slots}
        for slot in slots:
            runner.reset(slot)
            runner.extend(slot, torch.tensor(prompts[slot][:-1]))
        pending = torch.tensor([[prompts[slot][-1]] for slot in slots])
        for _ in range(new_tokens):
            pending = runner.step(slots, pending).argmax(-1)
            for row, slot in enumerate(slots):
                outputs[slot].append(int(pending[row, 0]))
        return outputs

    def generate(prompt: list[int], new_tokens: int) -> list[int]:
        output = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=new_tokens,
            do_sample=False,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        return output[0, len(prompt) :].tolist()

    outputs = decode([2, 0, 1], 12)
    for slot, output in outputs.items():
        assert output == generate(prompts[slot], 12)
    assert len(set(outputs[0])) > 1  # the random model does not just repeat one token
    prompts[1] = [3, 3, 9]
    assert decode([1], 6)[1] == generate(prompts[1], 6)


def test_mistakes_name_what_is_wrong() -> None:
    runner = FastRunner(build("llama"), slots=2, max_cache_length=16)
    with pytest.raises(SpeculorError, match=r"slot 2 does not exist: this runner has slots 0\.\.1"):
        runner.extend(2, torch.arange(3))
    with pytest.raises(SpeculorError, match="each slot at most once"):
        runner.step([1, 1], torch.zeros((2, 1), dtype=torch.long))
    with pytest.raises(SpeculorError, match="one row per slot: got \\(3, 1\\) for 2 slots"):
        runner.step([0, 1], torch.zeros((3, 1), dtype=torch.long))
    with pytest.raises(SpeculorError, match="slots must be an integer ≥ 1, got 0"):
        FastRunner(build("llama"), slots=0)
    with pytest.raises(SpeculorError, match="warm_up widths must be integers ≥ 1"):
        runner.warm_up([0, 2])


@pytest.mark.parametrize("name", ["llama3-rope", "qwen3", "gemma2"])
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


def test_auto_falls_back_to_hf_for_gpt2_with_one_notice(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One notice per kind of model, however many runners (a target and a draft) fall back."""
    monkeypatch.setattr(runners, "_noticed", set())
    with caplog.at_level(logging.WARNING, logger="speculor.runners"):
        runner = make_runner(tiny_gpt2(), "auto")
        make_runner(tiny_gpt2(), "auto")
    assert isinstance(runner, HFRunner)
    assert caplog.text.count("'gpt2' is not one of") == 1
    assert "one after another" in caplog.text


def test_fast_on_gpt2_names_the_reason() -> None:
    with pytest.raises(SpeculorError, match="fast runner cannot run GPT2LMHeadModel: architecture 'gpt2'"):
        make_runner(tiny_gpt2(), "fast")


def test_sliding_window_models_take_the_fast_runner() -> None:
    assert isinstance(make_runner(build("mistral-window"), "auto"), FastRunner)
    runner = make_runner(build("gemma2"), "auto")
    assert isinstance(runner, FastRunner)
    assert [layer.window for layer in runner.weights.layers] == [WINDOW, None]
    assert runner.weights.attention_softcap == 0.5


def test_length_dependent_rope_is_unsupported() -> None:
    torch.manual_seed(0)
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=dynamic)).eval()
    with pytest.raises(SpeculorError, match="rope type 'dynamic' is not one of"):
        make_runner(model, "fast")
    assert isinstance(make_runner(model, "auto"), HFRunner)


def test_cache_cap_bounds_max_length_and_overflow_is_a_clear_error() -> None:
    runner = FastRunner(build("llama"), slots=2, max_cache_length=16)
    assert runner.max_length == 16
    runner.extend(1, torch.arange(12))
    runner.step([1], torch.arange(4).view(1, 4))
    with pytest.raises(SpeculorError, match="cache holds 16 tokens per slot; slot 1's 16 \\+ 1 do not fit"):
        runner.step([0, 1], torch.zeros((2, 1), dtype=torch.long))
    assert runner.length(0) == 0  # a refused step changes nothing
    runner.rollback(1, 10)
    assert runner.length(1) == 10
    assert runner.step([1], torch.arange(6).view(1, 6)).shape == (1, 6, VOCAB)


def test_graph_capture_needs_cuda() -> None:
    with pytest.raises(SpeculorError, match="needs a CUDA device"):
        FastRunner(build("llama"), capture="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("capture", ["graph", "compile"])
def test_captured_steps_match_eager_on_cuda(capture: str) -> None:
    model = build("qwen3").cuda()
    captured, eager = FastRunner(model, slots=3, capture=capture), FastRunner(model, slots=3, capture="eager")
    generator = torch.Generator().manual_seed(2)
    for runner in (captured, eager):
        generator.manual_seed(2)
        for slot, length in enumerate((20, 150, 3)):
            runner.extend(slot, torch.randint(0, VOCAB, (length,), generator=generator).cuda())
    captured.warm_up([1, 2, 4])
    count_after_warm_up = captured.graph_count
    for rows, count, keep in [([0], 4, 21), ([2, 0], 1, None), ([1, 0, 2], 4, 22), ([0], 4, None), ([1, 2], 2, 23)]:
        tokens = torch.randint(0, VOCAB, (len(rows), count), generator=generator).cuda()
        assert relative_error(captured.step(rows, tokens), eager.step(rows, tokens)) <= 1e-5
        if keep is not None:
            captured.rollback(rows[0], keep)
            eager.rollback(rows[0], keep)
    # Buckets 1, 2, 3 × widths 1, 2, 4 were captured up front; the steps captured nothing more.
    assert count_after_warm_up == (9 if capture == "graph" else 0)
    assert captured.graph_count == count_after_warm_up


def test_fixed_width_makes_a_verified_token_bitwise_equal_to_decoding_it_alone() -> None:
    model = build("qwen3")
    batched, alone = FastRunner(model, slots=2, fixed_width=4), FastRunner(model, slots=2, fixed_width=4)
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, VOCAB, (30,), generator=generator)
    other = torch.randint(0, VOCAB, (5, 4), generator=generator)
    tokens = torch.randint(0, VOCAB, (3,), generator=generator)
    for runner in (batched, alone):
        runner.extend(0, prompt)
        runner.extend(1, other[0])
    # Both steps run two rows (same bucket): the verify of three tokens, and three decodes of one each.
    verified = batched.step([1, 0], torch.stack([other[1, :3], tokens]))[1]
    decoded = torch.cat([alone.step([0, 1], torch.stack([tokens[i : i + 1], other[i + 1, :1]]))[0] for i in range(3)])
    assert torch.equal(verified, decoded)
    assert relative_error(verified, reference_logits(model, [*prompt.tolist(), *tokens.tolist()], 3)) <= 1e-4
    with pytest.raises(SpeculorError, match="at most fixed_width=4 tokens, got 5"):
        batched.step([0], torch.zeros((1, 5), dtype=torch.long))


def test_extend_rows_prefills_several_slots_as_one_forward_would_each() -> None:
    """Chunks of different lengths padded into one forward leave every slot's cache as its own extend would, so the
    next steps' logits agree; the padding's keys past each row's end are never read."""
    model = build("llama3-rope")
    together, apart = FastRunner(model, slots=3), FastRunner(model, slots=3)
    generator = torch.Generator().manual_seed(5)
    chunks = [torch.randint(0, VOCAB, (length,), generator=generator) for length in (9, 30, 1)]
    together.extend(1, torch.arange(4))
    apart.extend(1, torch.arange(4))
    together.extend_rows([2, 1, 0], chunks)
    for slot, chunk in zip([2, 1, 0], chunks, strict=True):
        apart.extend(slot, chunk)
    assert [together.length(slot) for slot in range(3)] == [1, 34, 9]
    step = torch.randint(0, VOCAB, (3, 2), generator=generator)
    assert relative_error(together.step([0, 1, 2], step), apart.step([0, 1, 2], step)) <= 1e-6
