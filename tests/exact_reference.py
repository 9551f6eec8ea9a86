"""Exact references for speculative sampling, written apart from the engine's helpers so that a test comparing the
two is not the engine checked against itself.

Filtering comes from transformers' own warpers (temperature, then top-k, then top-p, then min-p), in float64. The
logits processors (bias, penalties, bans) are applied by `processed_logits`, one token at a time in plain Python,
from the whole context as the target alone has it. The law of one
speculative step is enumerated in plain Python: every draft sequence with its probability under q, and along it the
acceptance probability min(1, p/q), the residual normalize(max(0, p − q)) at a rejection and p after the last draft.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from speculor.sampling import SamplingParams

Distribution = list[float]
# A distribution over the next token given the tokens drafted so far in this step.
Conditional = Callable[[tuple[int, ...]], Distribution]
Law = dict[tuple[int, ...], float]


def warped_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of logits (..., V) as Hugging Face's warpers make them, in float64; greedy is one-hot."""
    scores = logits.to(torch.float64).reshape(-1, logits.shape[-1])
    if params.greedy:
        one_hot = torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(torch.float64)
        return one_hot.view(logits.shape)
    unused_ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(unused_ids, scores)
    return scores.softmax(-1).view(logits.shape)


def processed_logits(
    logits: torch.Tensor, prompt: list[int], generated: list[int], params: SamplingParams, end_ids: frozenset[int]
) -> torch.Tensor:
    """The logits (V,) after the processors, for the next token after `prompt` + `generated`, in the logits' own
    dtype: bias, then the repetition penalty over every token seen, then the frequency and presence penalties over
    the generated ones, then −inf for banned words and, before `min_tokens`, for `end_ids`."""
    scores = logits.clone()
    for token, bias in params.logit_bias:
        scores[token] += bias
    context = [*prompt, *generated]
    for token in set(context):
        if params.repetition_penalty != 1:
            penalty = torch.tensor(params.repetition_penalty, dtype=scores.dtype)
            scores[token] = scores[token] / penalty if scores[token] > 0 else scores[token] * penalty
    for token in set(generated):
        frequency = torch.tensor(params.frequency_penalty, dtype=scores.dtype)
        scores[token] -= frequency * generated.count(token)
        scores[token] -= torch.tensor(params.presence_penalty, dtype=scores.dtype)
    for word in params.bad_words:
        if len(word) == 1 or tuple(context[-(len(word) - 1) :]) == word[:-1]:
            scores[word[-1]] = float("-inf")
    if len(generated) < params.min_tokens:
        for token in end_ids:
            scores[token] = float("-inf")
    return scores


def residual(target: Distribution, draft: Distribution) -> Distribution:
    """normalize(max(0, p − q)); p itself when nothing is left (p == q, where a rejection has probability 0)."""
    excess = [max(0.0, p - q) for p, q in zip(target, draft, strict=True)]
    total = sum(excess)
    return [value / total for value in excess] if total > 0 else list(target)


def speculative_step_law(target: Conditional, draft: Conditional, count: int, vocab: int) -> Law:
    """The exact law of the tokens one speculative step emits (accepted drafts, then one token of the target's or
    the residual's): a sum over every draft sequence x of q(x) × the probability of each acceptance path."""
    law: Law = {}

    def add(tokens: tuple[int, ...], mass: float) -> None:
        if mass > 0:
            law[tokens] = law.get(tokens, 0.0) + mass

    for drafts in itertools.product(range(vocab), repeat=count):
        mass = 1.0
        for position in range(count):
            mass *= draft(drafts[:position])[drafts[position]]
        if mass == 0:
            continue
        for position in range(count + 1):
            kept = drafts[:position]
            if position == count:
                for token, probability in enumerate(target(kept)):
                    add((*kept, token), mass * probability)
                break
            p, q = target(kept), draft(kept)
            token = drafts[position]
            keep = min(1.0, p[token] / q[token])  # q[token] > 0: sequences q never drafts were skipped
            for other, probability in enumerate(residual(p, q)):
                add((*kept, other), mass * (1 - keep) * probability)
            mass *= keep
    return law


def target_law_of_prefixes(target: Conditional, law: Law, length: int, vocab: int) -> float:
    """The largest gap, over token sequences t of `length`, between the target's own probability of t and the
    probability that the step's output, continued by sampling from the target, starts with t. Zero is what
    losslessness means; it checks the reference itself against the theorem."""
    worst = 0.0
    for sequence in itertools.product(range(vocab), repeat=length):
        own = 1.0
        for position in range(length):
            own *= target(sequence[:position])[sequence[position]]
        through_step = 0.0
        for emitted, mass in law.items():
            shared = min(len(emitted), length)
            if emitted[:shared] != sequence[:shared]:
                continue
            for position in range(shared, length):
                mass *= target(sequence[:position])[sequence[position]]
            through_step += mass
        worst = max(worst, abs(own - through_step))
    return worst


def law_gap(first: Law, second: Law) -> float:
    """The largest difference in probability between two laws over the same outcomes."""
    return max(abs(first.get(outcome, 0.0) - second.get(outcome, 0.0)) for outcome in first.keys() | second.keys())
