"""Greedy speculative decoding returns exactly the target's own greedy output, token for token.

192 prompt/γ cases in all: 2 architectures × 32 with a random draft and × 32 with a noisy copy of the target,
16 with draft == target, 16 with an adversarial draft and 2 × 16 with n-gram lookup; float64 weights so no near-tie
can flip an argmax. Equality proves something only if the target's output varies and drafts are sometimes right and
sometimes wrong: the targets' greedy outputs are checked to be diverse (a target repeating one token would be
matched by almost anything), random drafts exercise the rejection path, and noisy copies accept part of their
drafts, so rejections land at every position of a run.
"""

from __future__ import annotations

import copy
import random
import statistics

import pytest
import torch
from conftest import reversed_lm_head

from speculor import SpeculativeDecoder

GAMMAS = (1, 2, 4, 8)
NEW_TOKENS = 20
# Noise added to every weight of the target, relative to that weight tensor's spread: TAR about 0.4–0.5.
COPY_NOISE = 0.1


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


def noisy_copy(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """The target with Gaussian noise on every weight (`scale` × that tensor's standard deviation): a draft that
    agrees with the target often but not always, like a real draft."""
    generator = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in noisy.parameters():
            if parameter.numel() > 1:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(noise * scale * parameter.std())
    return noisy


@pytest.fixture(scope="module")
def targets(llama_pair, gpt2_pair):
    return {"llama": llama_pair[0], "gpt2": gpt2_pair[0]}


@pytest.fixture(scope="module")
def greedy_outputs(targets):
    """Each target's own greedy output for every (γ, prompt) case of the draft-model test, computed once."""
    outputs = {}
    for architecture, target in targets.items():
        baseline = SpeculativeDecoder(target, dtype=torch.float64)
        for gamma in GAMMAS:
            for prompt in random_prompts(8, 96, seed=gamma):
                result = baseline.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
                outputs[architecture, tuple(prompt)] = result.token_ids
    return outputs


@pytest.fixture(scope="module")
def llama_baseline(llama_pair):
    return SpeculativeDecoder(llama_pair[0], dtype=torch.float64)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_targets_greedy_output_is_diverse(architecture, greedy_outputs):
    """No case's output is one token repeated, and outputs use several tokens on average."""
    distinct = [len(set(tokens)) for (name, _), tokens in greedy_outputs.items() if name == architecture]
    assert min(distinct) >= 2
    assert statistics.mean(distinct) >= 5


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("draft_kind", ["random", "noisy copy"])
def test_draft_model_matches_target_for_every_gamma(
    architecture, draft_kind, llama_pair, gpt2_pair, targets, greedy_outputs
):
    target = targets[architecture]
    if draft_kind == "random":
        draft = (llama_pair if architecture == "llama" else gpt2_pair)[1]
    else:
        draft = noisy_copy(target, COPY_NOISE, seed=5)
    speculative = SpeculativeDecoder(target, draft, dtype=torch.float64)
    cases = accepted = drafted = 0
    for gamma in GAMMAS:
        for prompt in random_prompts(8, 96, seed=gamma):
            result = speculative.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=gamma, ignore_eos=True)
            assert result.token_ids == greedy_outputs[architecture, tuple(prompt)], (architecture, gamma, prompt)
            assert result.stats.new_tokens == NEW_TOKENS
            accepted += result.stats.accepted
            drafted += result.stats.drafted
            cases += 1
    assert cases == 32
    if draft_kind == "noisy copy":
        assert 0.1 < accepted / drafted < 0.9


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
def test_prompt_lookup_matches_target(architecture, targets):
    target = targets[architecture]
    baseline = SpeculativeDecoder(target, dtype=torch.float64)
    lookup = SpeculativeDecoder(target, ngram=3, dtype=torch.float64)
    drafted = 0
    for gamma in GAMMAS:
        for prompt in repetitive_prompts(4, 96, seed=300 + gamma):
            result = lookup.generate(prompt, max_new_tokens=20, gamma=gamma, ignore_eos=True)
            assert result.token_ids == baseline.generate(prompt, max_new_tokens=20, ignore_eos=True).token_ids
            drafted += result.stats.drafted
    assert drafted > 0
