"""The Python API: `SpeculativeDecoder` (load once, generate many times) and `generate` (one shot)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel

from speculor.adaptive import FixedGamma, GammaPolicy
from speculor.engine import DecodeRequest, Decoding, Delta, GenerationResult
from speculor.errors import SpeculorError
from speculor.loading import eos_token_ids, load_model, resolve_device, resolve_dtype, shared_vocab_size
from speculor.proposers import DraftModelProposer, PromptLookupProposer, Proposer
from speculor.runners import make_runner
from speculor.sampling import SamplingParams
from speculor.text import TextTracker

ModelSource = str | os.PathLike | PreTrainedModel
LOADER_OPTIONS = ("ngram", "device", "dtype", "runner", "fixed_width", "kernels")


class SpeculativeDecoder:
    """A target model plus an optional way to draft: a draft model or n-gram prompt lookup (`ngram`, the longest
    n-gram to match). With neither, it decodes with the target alone, through the same runner.

    `device` defaults to CUDA when available; `dtype` to bfloat16 on a GPU and float32 on the CPU. `runner` picks
    the model runner: "auto" (the fast static-cache runner where the architecture supports it), "fast" or "hf".

    `fixed_width=W` (fast runner only) runs every target step — a one-token decode as well as a verify — at W tokens,
    so both round alike and greedy speculative output equals the target alone bit for bit even in bf16, where a
    near-tie can otherwise flip an argmax. It caps γ at W − 1 and costs W tokens of work per decode step.

    `kernels` picks how the fast runner does its small per-layer operations: "triton" (fused kernels, CUDA), "torch"
    (plain PyTorch, e.g. to rule the custom kernels out) or "auto" (Triton on CUDA when installed).
    """

    def __init__(
        self,
        target: ModelSource,
        draft: ModelSource | None = None,
        *,
        ngram: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        runner: str = "auto",
        fixed_width: int | None = None,
        kernels: str = "auto",
    ) -> None:
        if draft is not None and ngram is not None:
            raise SpeculorError("give either a draft model or ngram prompt lookup, not both")
        if ngram is not None and (not isinstance(ngram, int) or ngram < 1):
            raise SpeculorError(f"ngram must be an integer ≥ 1, got {ngram!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.target = load_model(target, self.device, self.dtype)
        self.draft = load_model(draft, self.device, self.dtype) if draft is not None else None
        self.ngram = ngram
        self.tokenizer = self.target.tokenizer
        if self.draft is not None:
            self.vocab_size = shared_vocab_size(self.target, self.draft)
        elif self.tokenizer is not None:
            self.vocab_size = min(len(self.tokenizer), self.target.logits_width)
        else:
            self.vocab_size = self.target.logits_width
        if fixed_width is not None and (not isinstance(fixed_width, int) or fixed_width < 1):
            raise SpeculorError(f"fixed_width must be an integer ≥ 1, got {fixed_width!r}")
        self.fixed_width = fixed_width
        self.target_runner = make_runner(self.target.model, runner, fixed_width=fixed_width, kernels=kernels)
        self.draft_runner = make_runner(self.draft.model, runner, kernels=kernels) if self.draft is not None else None
        self.eos_ids = eos_token_ids(self.target.model)

    @property
    def speculative(self) -> bool:
        return self.draft is not None or self.ngram is not None

    def _proposer(self) -> Proposer | None:
        if self.draft_runner is not None:
            return DraftModelProposer(self.draft_runner, self.vocab_size)
        if self.ngram is not None:
            return PromptLookupProposer(self.ngram, self.device)
        return None

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt given as text (needs a tokenizer) or as ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            if not prompt:
                raise SpeculorError("the prompt is empty")
            if self.tokenizer is None:
                raise SpeculorError(f"model {self.target.name!r} has no tokenizer: give the prompt as token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise SpeculorError(f"prompt token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        if not ids:
            raise SpeculorError("the prompt is empty")
        return ids

    def decoding(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        gamma: int | GammaPolicy = 4,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        speculative: bool | None = None,
    ) -> Decoding:
        """A checked, ready-to-iterate generation. `speculative=False` runs the target alone even when a draft is
        loaded (for baselines on the same runner)."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SpeculorError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
        policy = gamma
        if isinstance(gamma, int):
            if isinstance(gamma, bool) or gamma < 1:
                raise SpeculorError(f"gamma must be an integer ≥ 1, got {gamma!r}")
            if self.fixed_width is not None and gamma + 1 > self.fixed_width:
                raise SpeculorError(
                    f"gamma {gamma} needs verify steps of {gamma + 1} tokens, more than fixed_width={self.fixed_width}"
                )
            policy = FixedGamma(gamma)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) for s in stops):
            raise SpeculorError(f"stop must be a string or a list of strings, got {stop!r}")
        if stops and self.tokenizer is None:
            raise SpeculorError("stop strings need a tokenizer, and this model has none")
        prompt_ids = self.encode(prompt)
        self._check_length(len(prompt_ids), max_new_tokens)
        use_draft = self.speculative if speculative is None else speculative and self.speculative
        request = DecodeRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            params=params,
            gamma=policy,
            eos_ids=self.eos_ids,
            stop=tuple(stops),
            ignore_eos=ignore_eos,
            seed=seed,
            max_gamma=self.fixed_width - 1 if self.fixed_width is not None else None,
        )
        proposer = self._proposer() if use_draft else None
        return Decoding(self.target_runner, proposer, self.vocab_size, TextTracker(self.tokenizer, stops), request)

    def _check_length(self, prompt_length: int, max_new_tokens: int) -> None:
        runners = [("target", self.target.name, self.target_runner)]
        if self.draft_runner is not None and self.draft is not None:
            runners.append(("draft", self.draft.name, self.draft_runner))
        for role, name, runner in runners:
            if prompt_length + max_new_tokens > runner.max_length:
                raise SpeculorError(
                    f"prompt ({prompt_length} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the {role} "
                    f"model {name!r} context length of {runner.max_length} tokens"
                )

    def generate(self, prompt: str | Sequence[int], **options) -> GenerationResult:
        """Generate a completion; see `decoding` for the options. Returns text, generated ids and statistics."""
        decoding = self.decoding(prompt, **options)
        for _ in decoding:
            pass
        assert decoding.result is not None
        return decoding.result

    def stream(self, prompt: str | Sequence[int], **options) -> Iterator[Delta]:
        """Yield `Delta`s (new token ids and new text) as tokens are accepted. Checks happen before the first yield."""
        decoding = self.decoding(prompt, **options)
        return iter(decoding)

    def warm_up(self, gamma: int = 4) -> None:
        """Run once every step width that generations with this γ meet, so the first requests do not pay for them:
        on CUDA the fast runner captures a graph per step shape and compiles Triton kernel variants on first use (in
        a GPU tuning run the first γ tried looked 7x slower than the rest, benchmarks/RESULTS.md). The steps attend
        over the smallest cache span; a longer span is captured when first reached, which costs milliseconds."""
        if not isinstance(gamma, int) or gamma < 1:
            raise SpeculorError(f"gamma must be an integer ≥ 1, got {gamma!r}")
        widest = gamma + 1 if self.fixed_width is None else min(gamma + 1, self.fixed_width)
        # The draft runner feeds one token a step, or two after a fully accepted step (see DraftModelProposer).
        plans = [(self.target_runner, range(1, widest + 1)), (self.draft_runner, range(1, 3))]
        for runner, widths in plans:
            if runner is None:
                continue
            start = torch.zeros(1, dtype=torch.long, device=runner.device)
            runner.prefill(start)
            for width in widths:
                runner.forward(torch.zeros(width, dtype=torch.long, device=runner.device))
                runner.truncate(1)


def generate(
    target: ModelSource, draft: ModelSource | None, prompt: str | Sequence[int], **options
) -> GenerationResult:
    """One-shot helper: load the pair (the `LOADER_OPTIONS` among `options` go to the loader), generate, return."""
    loader_options = {key: options.pop(key) for key in LOADER_OPTIONS if key in options}
    return SpeculativeDecoder(target, draft, **loader_options).generate(prompt, **options)
