"""Sampling at the edges of float32: extreme but legal parameters give a valid distribution (greedy where they should),
values no tensor can hold are refused up front, and no row ever carries NaN into sampling or acceptance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from speculor import SpeculativeDecoder, SpeculorError
from speculor.sampling import RowSampling, SamplingParams, probabilities, row_probabilities, sample_rows

VOCAB = 11
TINY_TEMPERATURES = (1e-38, 1e-45, 1e-46, 5e-324, 1e-8)
TINY_TOP_PS = (1e-50, 1e-300, 5e-324)
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def large_logits(dtype: torch.dtype, rows: int = 4) -> torch.Tensor:
    """Logits of magnitude up to 1e4, +1e4 and -1e4 in every row, the maximum at a different index in each."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=generator, dtype=torch.float64) * 2e3
    logits[torch.arange(rows), torch.arange(rows) + 2] = 1e4
    logits[torch.arange(rows), (torch.arange(rows) + 6) % VOCAB] = -1e4
    return logits.to(dtype)


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)


def assert_distribution(probs: torch.Tensor) -> None:
    assert probs.isfinite().all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1).double(), torch.ones(probs.shape[:-1], dtype=torch.float64))


def with_temperatures(temperatures: list[float]) -> RowSampling:
    """Rows sampled at exactly these temperatures as float32 tensors, bypassing `SamplingParams`' normalisation, to
    show `row_probabilities` itself stays finite."""
    sampling = RowSampling.build([SamplingParams(temperature=1.0)] * len(temperatures), [0] * len(temperatures), "cpu")
    return dataclasses.replace(sampling, temperature=torch.tensor(temperatures, dtype=torch.float32))


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_a_tiny_temperature_is_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.greedy and params == SamplingParams()
    sampling = RowSampling.build([params], [0], "cpu")
    assert not sampling.any_sampled and sampling.temperature.tolist() == [0.0]


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_tiny_temperatures_reaching_the_tensors_still_give_the_argmax(dtype):
    logits = large_logits(dtype, rows=len(TINY_TEMPERATURES))
    probs = row_probabilities(logits, with_temperatures(list(TINY_TEMPERATURES)))
    assert_distribution(probs)
    assert torch.equal(probs.float(), one_hot_argmax(logits))


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("top_p", TINY_TOP_PS)
def test_a_tiny_top_p_keeps_only_the_most_likely_token(top_p, dtype):
    logits = large_logits(dtype) / 1e3
    for params in (SamplingParams(temperature=1.0, top_p=top_p), SamplingParams(temperature=0.7, top_k=5, top_p=top_p)):
        probs = probabilities(logits, params)
        assert_distribution(probs)
        assert torch.equal(probs.float(), one_hot_argmax(logits))


@pytest.mark.parametrize("top_k", [2**63, 10**30, VOCAB + 1])
def test_a_top_k_beyond_the_vocabulary_filters_nothing(top_k):
    logits = large_logits(torch.float32) / 1e3
    params = SamplingParams(temperature=0.9, top_k=top_k)
    assert torch.equal(probabilities(logits, params), probabilities(logits, SamplingParams(temperature=0.9)))


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_large_logits_at_ordinary_settings_give_valid_distributions(dtype):
    logits = large_logits(dtype)
    for params in (
        SamplingParams(temperature=1e-5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=3e38, top_p=0.5),
        SamplingParams(temperature=2.0, top_k=3, top_p=0.9),
    ):
        assert_distribution(probabilities(logits, params))
    # At the smallest sampled temperature a lead of 1000 in logits leaves nothing to the rest.
    assert torch.equal(probabilities(logits, SamplingParams(temperature=1e-5)).float(), one_hot_argmax(logits))


def test_rows_with_non_finite_logits_fall_back_to_their_argmax_alone():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1))
    logits[1, 4] = float("nan")
    logits[2, 5] = float("inf")
    params = [
        SamplingParams(temperature=1.0, top_p=0.95),
        SamplingParams(temperature=1.0),
        SamplingParams(),
        SamplingParams(temperature=0.5),
    ]
    probs = row_probabilities(logits, RowSampling.build(params, [0, 1, 2, 3], "cpu"))
    assert_distribution(probs)
    assert probs[1].tolist() == one_hot_argmax(logits[1]).tolist() and probs[1, 4] == 1
    assert probs[2].tolist() == one_hot_argmax(logits[2]).tolist() and probs[2, 5] == 1
    for row in (0, 3):
        torch.testing.assert_close(probs[row], probabilities(logits[row], params[row]))
        assert torch.count_nonzero(probs[row]) > 1


@pytest.mark.parametrize(
    ("options", "parameter"),
    [
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e39}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"temperature": -1e-30}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 1.0, "top_p": float("nan")}, "top_p"),
        ({"temperature": 1.0, "top_p": float("inf")}, "top_p"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_p": True}, "top_p"),
        ({"temperature": 1.0, "top_k": True}, "top_k"),
        ({"temperature": 1.0, "top_k": 2.0}, "top_k"),
        ({"temperature": 1.0, "top_k": -(2**63)}, "top_k"),
    ],
)
def test_values_no_tensor_can_hold_are_refused_naming_the_parameter(options, parameter):
    with pytest.raises(SpeculorError, match=f"^{parameter} must be"):
        SamplingParams(**options)


def test_any_integer_seed_builds_and_seeds_differ_modulo_two_to_the_64():
    seeds = [0, 1, -1, 2**63, 2**64 - 1, -(2**70) - 3, 2**200 + 7, 7]
    sampling = RowSampling.build([SamplingParams(temperature=1.0)] * len(seeds), seeds, "cpu")
    stored = sampling.seeds.tolist()
    # Seeds are 64-bit patterns: -1 and 2^64 - 1 are one seed, as are 2^200 + 7 and 7; others stay apart.
    assert stored[2] == stored[4] and stored[6] == stored[7] and len(set(stored)) == len(seeds) - 2
    logits = torch.zeros(len(seeds), 1000)
    tokens, _ = sample_rows(logits, sampling, torch.zeros(len(seeds), dtype=torch.long), stream=3)
    assert tokens[2] == tokens[4] and tokens[6] == tokens[7] and len(set(tokens.tolist())) > 3


def test_a_tiny_temperature_generates_exactly_the_greedy_text(model_dirs):
    decoder = SpeculativeDecoder(model_dirs["target"], model_dirs["draft"], device="cpu")
    prompt = "The quick brown fox"
    greedy = decoder.generate(prompt, max_new_tokens=24, gamma=3, ignore_eos=True)
    assert len(set(greedy.token_ids)) > 3, "the target repeats itself, the test proves nothing"
    for temperature in (1e-45, 1e-38, 5e-324):
        tiny = decoder.generate(prompt, max_new_tokens=24, gamma=3, ignore_eos=True, temperature=temperature, seed=5)
        assert tiny.token_ids == greedy.token_ids and tiny.text == greedy.text
