"""Every user mistake gets a clear error: `SpeculorError` from the API, one line and exit status 2 from the CLI."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build, tiny_llama_config, train_tiny_tokenizer
from transformers import LlamaForCausalLM

from speculor import SpeculativeDecoder, SpeculorError
from speculor.cli import main


@pytest.fixture(scope="module")
def decoder(llama_pair):
    return SpeculativeDecoder(llama_pair[0], llama_pair[1], dtype=torch.float64)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gamma": 0}, "gamma must be an integer ≥ 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer ≥ 1"),
        ({"temperature": -0.5}, "temperature must be a number ≥ 0"),
        ({"temperature": float("inf")}, "temperature must be a number ≥ 0 and finite"),
        ({"temperature": float("nan")}, "temperature must be a number ≥ 0 and finite"),
        ({"temperature": 1.0, "top_p": float("nan")}, "top_p must be in (0, 1]"),
        ({"temperature": 1.0, "top_k": 2.5}, "top_k must be an integer ≥ 0"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"temperature": 1.0, "top_k": -1}, "top_k must be an integer ≥ 0"),
        ({"max_new_tokens": 250}, "exceeds the target model"),
        ({"stop": "x"}, "stop strings need a tokenizer"),
    ],
)
def test_bad_generation_options(decoder, options, message):
    with pytest.raises(SpeculorError, match=re.escape(message)):
        decoder.generate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], **options)


def test_a_top_k_past_any_vocabulary_is_no_filter_rather_than_an_error(decoder):
    """top_k is normalised when the request is made: 2**63 never reaches an int64 tensor mid-batch."""
    options = dict(max_new_tokens=8, ignore_eos=True, temperature=1.0, seed=3)
    unfiltered = decoder.generate([1, 2, 3, 4], **options).token_ids
    assert len(set(unfiltered)) > 2
    for top_k in (2**63, 10**30):
        assert decoder.generate([1, 2, 3, 4], top_k=top_k, **options).token_ids == unfiltered


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "the prompt is empty"),
        ("", "the prompt is empty"),
        ([1, 500], "prompt token ids must be integers in"),
        ("text", "has no tokenizer"),
    ],
)
def test_bad_prompts(decoder, prompt, message):
    with pytest.raises(SpeculorError, match=message):
        decoder.generate(prompt)


def test_nothing_generated_before_an_error_and_decoder_still_works(decoder):
    with pytest.raises(SpeculorError):
        decoder.generate([1, 2], gamma=-1)
    assert len(decoder.generate([1, 2], max_new_tokens=5, ignore_eos=True).token_ids) == 5


def test_missing_model_path(tmp_path):
    with pytest.raises(SpeculorError, match="does not exist"):
        SpeculativeDecoder(str(tmp_path / "nowhere"))


def test_unreadable_model_directory(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(SpeculorError, match="could not load model"):
        SpeculativeDecoder(str(tmp_path))


def test_draft_and_ngram_together(llama_pair):
    with pytest.raises(SpeculorError, match="not both"):
        SpeculativeDecoder(llama_pair[0], llama_pair[1], ngram=3)


def test_logits_width_mismatch_without_tokenizers(llama_pair):
    wider = build(LlamaForCausalLM, tiny_llama_config(vocab_size=100, layers=1), seed=5)
    with pytest.raises(SpeculorError, match=r"scores 96 tokens and draft .* scores 100"):
        SpeculativeDecoder(llama_pair[0], wider, dtype=torch.float64)


def save_model(path, vocab_size, tokenizer, seed):
    model = build(LlamaForCausalLM, tiny_llama_config(vocab_size=vocab_size, layers=1), seed, torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_different_tokenizers_are_refused(tmp_path, text_pair_dirs):
    other = train_tiny_tokenizer(vocab_size=280)
    draft = save_model(tmp_path / "other", len(other), other, seed=6)
    with pytest.raises(SpeculorError, match="different tokenizers"):
        SpeculativeDecoder(str(text_pair_dirs[0]), str(draft))


def test_padded_embedding_with_same_tokenizer_is_allowed(tmp_path, text_pair_dirs):
    """Qwen style: the draft's embedding is padded past the tokenizer; logits are compared over the shared range."""
    target_dir = text_pair_dirs[0]
    decoder = SpeculativeDecoder(str(target_dir), dtype="float32")
    padded = save_model(tmp_path / "padded", len(decoder.tokenizer) + 20, decoder.tokenizer, seed=7)
    speculative = SpeculativeDecoder(str(target_dir), str(padded), dtype="float32")
    assert speculative.vocab_size == len(decoder.tokenizer)
    prompt = "class Point:\n"
    expected = decoder.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    assert speculative.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids == expected


def run_cli(capsys, *args):
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gamma", "0"], "gamma must be"),
        (["--max-new-tokens", "0"], "max_new_tokens must be"),
        (["--temperature", "-1"], "temperature must be"),
        (["--temperature", "inf"], "temperature must be"),
        (["--top-p", "2", "--temperature", "1"], "top_p must be"),
        (["--top-k", "-3", "--temperature", "1"], "top_k must be"),
        (["--max-new-tokens", "100000"], "context length"),
        pytest.param(
            ["--kernels", "triton", "--device", "cpu"],
            "kernels='triton' needs a CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without CUDA"),
        ),
        (["--kernels", "triton", "--runner", "hf"], "kernels='triton' needs the fast runner"),
    ],
)
def test_cli_bad_options_exit_cleanly(capsys, text_pair_dirs, extra, message):
    target, draft = map(str, text_pair_dirs)
    status, _, err = run_cli(capsys, "generate", "--target", target, "--draft", draft, "--prompt", "x = 1\n", *extra)
    assert status == 2
    assert "error:" in err and message in err
    assert "Traceback" not in err


def test_cli_missing_model_and_empty_prompt(capsys, tmp_path, text_pair_dirs):
    status, _, err = run_cli(capsys, "generate", "--target", str(tmp_path / "missing"), "--prompt", "x")
    assert status == 2 and "does not exist" in err
    status, _, err = run_cli(capsys, "generate", "--target", str(text_pair_dirs[0]), "--prompt", "")
    assert status == 2 and "the prompt is empty" in err
    status, _, err = run_cli(capsys, "generate", "--target", str(text_pair_dirs[0]), "--prompt-ids", "1,x")
    assert status == 2 and "comma-separated integers" in err


def test_cli_draft_and_ngram_are_exclusive(capsys, text_pair_dirs):
    target, draft = map(str, text_pair_dirs)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--target", target, "--draft", draft, "--ngram", "3", "--prompt", "x"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
