"""Greedy speculative decoding returns exactly the target's own greedy output, token for token.

128 prompt/γ cases in all: 2 architectures × 32 with a random draft, 16 with draft == target, 16 with an
adversarial draft and 2 × 16 with n-gram lookup; float64 weights so no near-tie can flip an argmax.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import reversed_lm_head

from speculor import SpeculativeDecoder

GAMMAS = (1, 2, 4, 8)


def random_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(count)]


def repetitive_prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a motif, so n-gram lookup finds matches and has drafts to verify."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        motif = [rng.randrange(vocab) for _ in range(rng.randint(2, 5))]
        prompts.append(motif * rng.randint(2, 4))
    return prompts


@pytest.fixture(scope="module")
def llama_baseline(llama_pair):
    return SpeculativeDecoder(llama_pair[0], dtype=torch.float64)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_draft_model_matches_target_for_every_gamma(architecture, llama_pair, gpt2_pair):
    target, draft = llama_pair if architecture == "llama" else gpt2_pair
    baseline = SpeculativeDecoder(target, dtype=torch.float64)
    speculative = SpeculativeDecoder(target, draft, dtype=torch.float64)
    cases = 0
    for gamma in GAMMAS:
        for prompt in random_prompts(8, 96, seed=gamma):
            expected = baseline.generate(prompt, max_new_tokens=20, ignore_eos=True).token_ids
            result = speculative.generate(prompt, max_new_tokens=20, gamma=gamma, ignore_eos=True)
            assert result.token_ids == expected, (architecture, gamma, prompt)
            assert result.stats.new_tokens == 20
            cases += 1
    assert cases == 32


def test_draft_equal_to_target_accepts_everything(llama_pair, llama_baseline):
    target = llama_pair[0]
    decoder = SpeculativeDecoder(target, target, dtype=torch.float64)
    for gamma in GAMMAS:
        for prompt in random_prompts(4, 96, seed=100 + gamma):
            result = decoder.generate(prompt, max_new_tokens=24, gamma=gamma, ignore_eos=True)
            assert result.token_ids == llama_baseline.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
            assert result.stats.acceptance_rate == 1.0
            # The first token is the target's alone; every later step but the shortened last one keeps all γ
            # drafts plus the bonus token.
            assert result.stats.target_forwards == 1 + -(-23 // (gamma + 1))


def test_adversarial_draft_is_always_rejected(llama_pair, llama_baseline):
    target = llama_pair[0]
    decoder = SpeculativeDecoder(target, reversed_lm_head(target), dtype=torch.float64)
    for gamma in GAMMAS:
        for prompt in random_prompts(4, 96, seed=200 + gamma):
            result = decoder.generate(prompt, max_new_tokens=16, gamma=gamma, ignore_eos=True)
            assert result.token_ids == llama_baseline.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids
            assert result.stats.accepted == 0
            assert result.stats.mean_accepted_length == 1.0


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_prompt_lookup_matches_target(architecture, llama_pair, gpt2_pair):
    target = (llama_pair if architecture == "llama" else gpt2_pair)[0]
    baseline = SpeculativeDecoder(target, dtype=torch.float64)
    lookup = SpeculativeDecoder(target, ngram=3, dtype=torch.float64)
    drafted = 0
    for gamma in GAMMAS:
        for prompt in repetitive_prompts(4, 96, seed=300 + gamma):
            result = lookup.generate(prompt, max_new_tokens=20, gamma=gamma, ignore_eos=True)
            assert result.token_ids == baseline.generate(prompt, max_new_tokens=20, ignore_eos=True).token_ids
            drafted += result.stats.drafted
    assert drafted > 0
