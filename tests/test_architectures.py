"""Greedy speculative decoding on the Hugging Face runner equals the target's own `generate`, architecture by
architecture.

Each architecture is built tiny from its config (random weights, float32), saved as a real checkpoint directory with
and without tokenizer files, and loaded through `SpeculativeDecoder(..., runner="hf")`. The draft is the target cut
to its first layer: it agrees with the target often but not always, so steps accept none, some and all of their
drafts, and every rollback path runs (a draft from another seed is almost never accepted). Where a sliding window
is in use it is 6 tokens, and prompts plus generations run well past it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import train_tiny_tokenizer
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from speculor import SpeculativeDecoder, SpeculorError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WINDOW = 6
PROMPT_LENGTHS = (3, 9, 14)
GAMMAS = (1, 3, 5)
NEW_TOKENS = 16

COMMON_SETTINGS = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Architecture:
    """A tiny variant of one model type: `settings` override the common ones, `per_depth` gives settings that
    depend on the number of layers, `without` names common settings this config refuses."""

    name: str
    model_type: str
    settings: dict = field(default_factory=dict)
    per_depth: Callable[[int], dict] | None = None
    without: tuple[str, ...] = ()

    def model(self, vocab_size: int, layers: int, seed: int) -> PreTrainedModel:
        settings = {key: value for key, value in COMMON_SETTINGS.items() if key not in self.without}
        settings.update(self.settings, vocab_size=vocab_size, num_hidden_layers=layers)
        if self.per_depth is not None:
            settings.update(self.per_depth(layers))
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(self.model_type, **settings)).float().eval()


def gpt_neo_layers(layers: int) -> dict:
    """GPT-Neo alternates global and local (windowed) attention; the one-layer draft keeps the local one."""
    pattern = ["local"] if layers == 1 else ["global", "local"]
    return dict(attention_types=[[pattern, max(1, layers // 2)]], window_size=WINDOW)


ARCHITECTURES = [
    Architecture("llama", "llama"),
    Architecture("mistral", "mistral", dict(sliding_window=None)),
    Architecture("mistral-window", "mistral", dict(sliding_window=WINDOW)),
    Architecture("mixtral-window", "mixtral", dict(sliding_window=WINDOW, num_local_experts=4)),
    Architecture("qwen2-window", "qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    Architecture("qwen2_moe", "qwen2_moe", dict(num_experts=4, moe_intermediate_size=32)),
    Architecture("qwen3", "qwen3"),
    Architecture("qwen3_moe", "qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    Architecture("gemma", "gemma"),
    Architecture("gemma2-window", "gemma2", dict(sliding_window=WINDOW)),
    Architecture("gemma3_text-window", "gemma3_text", dict(sliding_window=WINDOW)),
    Architecture("cohere2-window", "cohere2", dict(sliding_window=WINDOW)),
    Architecture("exaone4-window", "exaone4", dict(sliding_window=WINDOW)),
    Architecture("ministral-window", "ministral", dict(sliding_window=WINDOW)),
    Architecture("vaultgemma-window", "vaultgemma", dict(sliding_window=WINDOW)),
    Architecture("granite_swa-window", "granite_swa", dict(sliding_window=WINDOW)),
    Architecture("olmo3-window", "olmo3", dict(sliding_window=WINDOW)),
    Architecture("gpt_oss-window", "gpt_oss", dict(sliding_window=WINDOW, num_local_experts=4)),
    Architecture("llama4_text-chunked", "llama4_text", dict(attention_chunk_size=WINDOW, num_local_experts=2)),
    Architecture("starcoder2-window", "starcoder2", dict(sliding_window=WINDOW)),
    Architecture("gpt_neo-window", "gpt_neo", per_depth=gpt_neo_layers),
    Architecture("gpt2", "gpt2"),
    Architecture("bert-decoder", "bert", dict(is_decoder=True, initializer_range=0.05)),
    Architecture("gptj", "gptj", dict(rotary_dim=4)),
    Architecture("codegen", "codegen", dict(rotary_dim=4)),
    Architecture("gpt_neox", "gpt_neox"),
    Architecture("opt", "opt", dict(ffn_dim=64, word_embed_proj_dim=32)),
    Architecture("phi", "phi"),
    Architecture("phi3", "phi3"),
    Architecture("olmo", "olmo"),
    Architecture("olmo2", "olmo2"),
    Architecture("cohere", "cohere"),
    Architecture("falcon", "falcon", without=("head_dim",)),
    Architecture("bloom", "bloom", dict(initializer_range=0.2)),
    Architecture("mpt", "mpt"),
    Architecture("stablelm", "stablelm"),
    Architecture("granite", "granite"),
    Architecture("mamba", "mamba", dict(state_size=4)),
    Architecture("falcon_mamba", "falcon_mamba", dict(state_size=4)),
    Architecture("lfm3-conv-window", "lfm3", dict(sliding_window=WINDOW)),
    Architecture("zaya-hybrid", "zaya"),
    Architecture("lara_mini-hybrid-window", "lara_mini", dict(sliding_window=WINDOW)),
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return train_tiny_tokenizer()


def prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(vocab_size, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]


def target_alone(model: PreTrainedModel, prompt: list[int]) -> list[int]:
    output = model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )
    return output[0, len(prompt) :].tolist()


def save_pair(target: PreTrainedModel, draft: PreTrainedModel, root: Path, tokenizer=None) -> tuple[Path, Path]:
    paths = (root / "target", root / "draft")
    for model, path in zip((target, draft), paths, strict=True):
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return paths


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda architecture: architecture.name)
def test_greedy_output_equals_the_targets_own_generate(architecture, tokenizer, tmp_path):
    if architecture.model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers version has no {architecture.model_type!r} architecture")
    vocab_size = len(tokenizer)
    target = architecture.model(vocab_size, layers=2, seed=0)
    draft = architecture.model(vocab_size, layers=1, seed=1)
    # The target's own weights wherever the shallower model has the same parameter: its first layer and the vocabulary.
    draft.load_state_dict(target.state_dict(), strict=False)

    bare = SpeculativeDecoder(*save_pair(target, draft, tmp_path / "bare"), runner="hf", device="cpu", dtype="float32")
    assert bare.tokenizer is None and bare.vocab_size == vocab_size
    drafted = accepted = 0
    for prompt in prompts(vocab_size):
        expected = target_alone(target, prompt)
        assert len(set(expected)) > 1, f"{architecture.name}: the target repeats one token, the test proves nothing"
        for gamma in GAMMAS:
            result = bare.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=gamma, ignore_eos=True)
            assert result.token_ids == expected, (architecture.name, len(prompt), gamma)
            drafted += result.stats.drafted
            accepted += result.stats.accepted
    assert 0 < accepted < drafted, f"{architecture.name}: drafts must be both accepted and rejected"

    paths = save_pair(target, draft, tmp_path / "with-tokenizer", tokenizer)
    texts = SpeculativeDecoder(*paths, runner="hf", device="cpu", dtype="float32")
    text_prompt = "def add(a, b):\n    return"
    result = texts.generate(text_prompt, max_new_tokens=NEW_TOKENS, gamma=3, ignore_eos=True)
    assert result.token_ids == target_alone(target, texts.encode(text_prompt))
    assert texts.tokenizer is not None and result.text


REFUSED = [
    (Architecture("openai-gpt", "openai-gpt", dict(n_positions=128)), "takes no KV cache argument"),
    (Architecture("rwkv", "rwkv", dict(context_length=128)), "a cache of its own"),
    (Architecture("minimax", "minimax", dict(num_local_experts=2)), "a cache of its own"),
    (Architecture("deepseek_v4", "deepseek_v4"), "cache layers of kind DeepseekV4HCACache"),
    (Architecture("bert-encoder", "bert"), "attends to later tokens too"),
    (Architecture("megatron-bert-encoder", "megatron-bert"), "bidirectional encoder unless"),
    (
        Architecture(
            "recurrent_gemma",
            "recurrent_gemma",
            dict(attention_window_size=WINDOW, lru_width=32, block_types=["recurrent", "attention"]),
        ),
        r"keeps decoding state on its own modules \(model\.layers\.0\.temporal_block\.conv1d_state",
    ),
]


@pytest.mark.parametrize(("architecture", "reason"), REFUSED, ids=[architecture.name for architecture, _ in REFUSED])
def test_models_that_cannot_roll_back_are_refused_before_generating(architecture, reason, tmp_path):
    if architecture.model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers version has no {architecture.model_type!r} architecture")
    architecture.model(96, layers=2, seed=0).save_pretrained(tmp_path)
    with pytest.raises(SpeculorError, match=reason):
        SpeculativeDecoder(tmp_path, tmp_path, runner="hf", device="cpu", dtype="float32")
