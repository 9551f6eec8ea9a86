"""Shared fixtures: tiny random models built from configs (no downloads), saved as real Hugging Face directories."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels (speculor.runners.triton_ops) run in Triton's CPU interpreter. Triton reads this
# when it decorates a kernel, its own library functions included, so it must be set before Triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TOKENIZER_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for item in items:\n    print(item)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
    "The quick brown fox jumps over the lazy dog. Hello world!\n",
] * 4


def tiny_llama_config(vocab_size: int = 96, layers: int = 2, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_gpt2_config(vocab_size: int = 96, layers: int = 2, **overrides) -> GPT2Config:
    settings = dict(
        vocab_size=vocab_size,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        eos_token_id=None,
        bos_token_id=None,
    )
    settings.update(overrides)
    return GPT2Config(**settings)


def build(model_class, config, seed: int, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    return model_class(config).to(dtype).eval()


def reversed_lm_head(model):
    """A copy of `model` whose output layer is negated: its argmax is the original's argmin, so as a greedy draft for
    `model` every proposal is rejected (TAR exactly 0)."""
    adversary = copy.deepcopy(model)
    with torch.no_grad():
        adversary.lm_head.weight.neg_()
    return adversary


@pytest.fixture(scope="module")
def float32_pair():
    """A float32 target and a draft that is a noisy copy of it, so drafts are partly accepted."""
    target = build(LlamaForCausalLM, tiny_llama_config(layers=2), seed=0, dtype=torch.float32)
    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return target, draft


@pytest.fixture(scope="session")
def llama_pair():
    """(target, draft): Llama-architecture, random weights, float64 so no argmax near-tie can flip."""
    return build(LlamaForCausalLM, tiny_llama_config(layers=2), seed=0), build(
        LlamaForCausalLM, tiny_llama_config(layers=1), seed=1
    )


@pytest.fixture(scope="session")
def gpt2_pair():
    """(target, draft): GPT-2, random weights initialised at 0.2 — at GPT-2's default 0.02 the tiny target's greedy
    output is one token repeated, which any draft matches."""
    return build(GPT2LMHeadModel, tiny_gpt2_config(layers=2, initializer_range=0.2), seed=2), build(
        GPT2LMHeadModel, tiny_gpt2_config(layers=1, initializer_range=0.2), seed=3
    )


def train_tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def text_pair_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Target and draft directories with a shared tokenizer, as `from_pretrained` expects them on disk."""
    tokenizer = train_tiny_tokenizer()
    root = tmp_path_factory.mktemp("text_pair")
    paths = []
    for name, layers, seed in (("target", 2, 10), ("draft", 1, 11)):
        model = build(
            LlamaForCausalLM, tiny_llama_config(vocab_size=len(tokenizer), layers=layers), seed, torch.float32
        )
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (the server tests use it): the server's worker, its event loop, the clients and
    the test's offline decoder take turns on 2 shared cores, and OpenMP's spinning threads slow small models down
    many times over when oversubscribed. OMP_NUM_THREADS=1 keeps decoders built meanwhile (threads="auto") at one."""
    threads = torch.get_num_threads()
    omp_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if omp_threads is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = omp_threads


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """The server tests' tiny target, draft and chat-template-less target (`server_support.build_model_dirs`)."""
    from server_support import build_model_dirs

    return build_model_dirs(tmp_path_factory.mktemp("server_models"))


@pytest.fixture(scope="module")
def reference(model_dirs):
    """The offline decoder a server's answers must match (loaded separately from the server's)."""
    from speculor import SpeculativeDecoder

    return SpeculativeDecoder(model_dirs["target"], model_dirs["draft"], device="cpu")


@pytest.fixture(scope="module")
def server_url(model_dirs) -> Iterator[str]:
    """A server over the tiny pair with a chat template, for one test module."""
    from server_support import GAMMA, MODEL, serving

    from speculor import SpeculativeDecoder
    from speculor.server import create_app

    decoder = SpeculativeDecoder(model_dirs["target"], model_dirs["draft"], device="cpu")
    with serving(create_app(decoder, gamma=GAMMA, model_name=MODEL)) as running:
        yield running.url
