"""Tokenizer-less checkpoint directories: no tokenizer files means no tokenizer (not transformers' empty
placeholder), and a pair where only one model has a tokenizer is checked as far as it can be, with a warning."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import train_tiny_tokenizer
from tokenizers import Tokenizer, models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from speculor import SpeculativeDecoder, SpeculorError


def save_model(path, model_type: str, vocab_size: int, layers: int = 1, tokenizer=None):
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(layers)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


# Model types for which transformers 5 builds a one-to-five-token placeholder tokenizer from a bare directory.
@pytest.mark.parametrize("model_type", ["gpt2", "qwen2", "gemma2", "mamba", "opt"])
def test_a_directory_without_tokenizer_files_has_no_tokenizer(model_type, tmp_path):
    path = save_model(tmp_path, model_type, vocab_size=96)
    decoder = SpeculativeDecoder(path, runner="hf", device="cpu", dtype="float32")
    assert decoder.tokenizer is None and decoder.vocab_size == 96
    result = decoder.generate([5, 17, 90], max_new_tokens=4, ignore_eos=True)
    assert result.text is None and len(result.token_ids) == 4
    with pytest.raises(SpeculorError, match="has no tokenizer: give the prompt as token ids"):
        decoder.generate("text needs a tokenizer")


def test_a_tokenizer_of_special_tokens_only_is_ignored(tmp_path):
    placeholder = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0, "<pad>": 1}, unk_token="<eos>")),
        eos_token="<eos>",
        pad_token="<pad>",
    )
    path = save_model(tmp_path, "llama", vocab_size=96, tokenizer=placeholder)
    assert SpeculativeDecoder(path, runner="hf", device="cpu", dtype="float32").tokenizer is None


def test_one_sided_tokenizer_is_checked_against_the_logits_and_warned_about(tokenizer, tmp_path, caplog):
    size = len(tokenizer)
    target = save_model(tmp_path / "target", "llama", vocab_size=size, layers=2, tokenizer=tokenizer)
    draft = save_model(tmp_path / "draft", "llama", vocab_size=size)
    with caplog.at_level(logging.WARNING, logger="speculor.loading"):
        decoder = SpeculativeDecoder(target, draft, runner="hf", device="cpu", dtype="float32")
    assert decoder.vocab_size == size
    assert "could not be compared" in caplog.text
    assert decoder.generate("def add(a, b):", max_new_tokens=4, gamma=2).text is not None
    narrow = save_model(tmp_path / "narrow", "llama", vocab_size=size - 10)
    with pytest.raises(SpeculorError, match=f"has no tokenizer and scores {size - 10} tokens, fewer than the {size}"):
        SpeculativeDecoder(target, narrow, runner="hf", device="cpu", dtype="float32")
    with pytest.raises(SpeculorError, match="has no tokenizer and scores"):
        SpeculativeDecoder(narrow, target, runner="hf", device="cpu", dtype="float32")
