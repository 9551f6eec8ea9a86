"""`fixed_width`: every target step runs at the same width, so verify and decode round alike."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2_config
from transformers import GPT2LMHeadModel

from speculor import SpeculativeDecoder, SpeculorError
from speculor.adaptive import FixedGamma
from speculor.runners import FastRunner


@pytest.fixture(scope="module")
def uniform_pair(llama_pair):
    target, draft = llama_pair
    return SpeculativeDecoder(target, draft, dtype=torch.float64, runner="fast", fixed_width=5)


def test_greedy_output_with_fixed_width_equals_target_alone(uniform_pair, llama_pair):
    assert isinstance(uniform_pair.target_runner, FastRunner)
    assert uniform_pair.target_runner.fixed_width == 5
    reference = SpeculativeDecoder(llama_pair[0], dtype=torch.float64, runner="hf")
    for prompt in ([3, 1, 4, 1, 5], [9, 2, 6], [7]):
        expected = reference.generate(prompt, max_new_tokens=20, ignore_eos=True).token_ids
        for gamma in (1, 2, 4):
            result = uniform_pair.generate(prompt, max_new_tokens=20, gamma=gamma, ignore_eos=True)
            assert result.token_ids == expected
        assert (
            uniform_pair.generate(prompt, max_new_tokens=20, speculative=False, ignore_eos=True).token_ids == expected
        )


def test_gamma_beyond_the_width_is_refused_and_policies_are_capped(uniform_pair):
    with pytest.raises(SpeculorError, match="more than fixed_width=5"):
        uniform_pair.generate([1, 2, 3], gamma=5)

    class Greedy(FixedGamma):
        """A policy asking for more drafts than the width allows."""

    result = uniform_pair.generate([1, 2, 3], max_new_tokens=20, gamma=Greedy(9), ignore_eos=True)
    assert len(result.stats.drafted_by_position) <= 4


def test_fixed_width_needs_the_fast_runner(llama_pair):
    with pytest.raises(SpeculorError, match="fixed_width needs the fast runner"):
        SpeculativeDecoder(llama_pair[0], runner="hf", fixed_width=4)
    with pytest.raises(SpeculorError, match="fixed_width needs the fast runner"):
        SpeculativeDecoder(GPT2LMHeadModel(tiny_gpt2_config()), fixed_width=4)
    with pytest.raises(SpeculorError, match="fixed_width must be an integer"):
        SpeculativeDecoder(llama_pair[0], fixed_width=0)
