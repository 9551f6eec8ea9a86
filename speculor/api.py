"""The Python API: `SpeculativeDecoder` (load once, generate many times) and `generate` (one shot)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from transformers import PreTrainedModel

from speculor.adaptive import AUTO_MAX_GAMMA, FixedGamma, GammaPolicy, LoadAwareGamma
from speculor.distributed import RankAgreedGamma, agreed_seed, tensor_parallel_group
from speculor.eagle import Eagle3Proposer, is_eagle3_checkpoint, load_eagle3
from speculor.engine import DEFAULT_PREFILL_CHUNK, BatchEngine, DecodeRequest, Decoding, Delta, GenerationResult
from speculor.errors import SpeculorError
from speculor.grammar import CompiledStructure, StructuredOutput, structure_compiler
from speculor.loading import eos_token_ids, load_model, resolve_device, resolve_dtype, shared_vocab_size
from speculor.proposers import (
    DraftModelProposer,
    ParallelDraftProposer,
    ParallelDraftSpec,
    PromptLookupProposer,
    Proposer,
)
from speculor.runners import make_runner
from speculor.runners.tensor_parallel import load_sharded_target
from speculor.sampling import SamplingParams
from speculor.threads import use_cpu_threads

ModelSource = str | os.PathLike | PreTrainedModel
LOADER_OPTIONS = ("ngram", "device", "dtype", "runner", "fixed_width", "kernels", "max_batch_size", "tensor_parallel")
DEFAULT_MAX_BATCH_SIZE = 8
PREFILL_WARM_UP_LENGTHS = (1, 16, 17, 15, 32, 1, 47)


class SpeculativeDecoder:
    """A target model plus an optional way to draft: a draft model, an EAGLE-3 head (a `draft` directory in the
    hub layout vLLM and SGLang load, detected from its config; it reads the target's own hidden states,
    `speculor.eagle`) or n-gram prompt lookup (`ngram`, the longest n-gram to match). With none, it decodes with the
    target alone, through the same runner.

    `device` defaults to CUDA when available; `dtype` to bfloat16 on a GPU and float32 on the CPU. `runner` picks
    the model runner: "auto" (the fast static-cache runner where the architecture supports it), "fast" or "hf".

    `fixed_width=W` (fast runner only) runs every target step — a one-token decode as well as a verify — at W tokens,
    so both round alike and greedy speculative output equals the target alone bit for bit even in bf16, where a
    near-tie can otherwise flip an argmax. It caps γ at W − 1 and costs W tokens of work per decode step.

    `kernels` picks how the fast runner does its small per-layer operations: "triton" (fused kernels, CUDA), "torch"
    (plain PyTorch, e.g. to rule the custom kernels out) or "auto" (Triton on CUDA when installed).

    `max_batch_size` is how many sequences generate together (each runner keeps that many KV-cache slots, allocated
    up front: on the fast runner slots × max cache length × the model's key/value bytes per token). A prompt list
    longer than that runs as a rolling batch. `prefill_chunk` bounds the prompt tokens prefilled per engine step, so
    a long prompt joining a running batch delays the other rows by one chunk at a time.

    `threads` sets torch's CPU threads (CPU only; process-wide, as torch's setting is): "auto" (the default, as on
    the command line) for one per physical core no other process is busy on, or `OMP_NUM_THREADS` when set
    (`speculor.threads`); an int; or None to leave torch's setting alone. torch's own default of one thread per
    core collapses when another process holds a core (8 tok/s instead of 256 on two cores with one busy process).

    `tensor_parallel=N` splits the target over N processes, one per GPU (`torchrun --nproc-per-node N`; see
    `speculor.runners.tensor_parallel`): each rank loads its shard from the target's directory and runs the same
    generations, and the draft runs whole on every rank. Every rank must make the same calls.
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
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        threads: int | str | None = "auto",
        tensor_parallel: int = 1,
    ) -> None:
        if draft is not None and ngram is not None:
            raise SpeculorError("give either a draft model or ngram prompt lookup, not both")
        if ngram is not None and (not isinstance(ngram, int) or ngram < 1):
            raise SpeculorError(f"ngram must be an integer ≥ 1, got {ngram!r}")
        self.device = resolve_device(device)
        self.tensor_parallel = tensor_parallel_group(tensor_parallel, self.device, runner)
        if self.tensor_parallel is not None:
            self.device = self.tensor_parallel.device
        if threads is not None:
            if threads != "auto" and (not isinstance(threads, int) or isinstance(threads, bool)):
                raise SpeculorError(f"threads must be an integer ≥ 1 or 'auto', got {threads!r}")
            use_cpu_threads(None if threads == "auto" else threads, self.device)
        self.dtype = resolve_dtype(dtype, self.device)
        sharded_runner = None
        if self.tensor_parallel is None:
            self.target = load_model(target, self.device, self.dtype)
        else:
            options = {"fixed_width": fixed_width, "kernels": kernels, "slots": max_batch_size}
            self.target, sharded_runner = load_sharded_target(target, self.tensor_parallel, self.dtype, **options)
        eagle_head = is_eagle3_checkpoint(draft)
        self.draft = load_model(draft, self.device, self.dtype) if draft is not None and not eagle_head else None
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
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise SpeculorError(f"max_batch_size must be an integer ≥ 1, got {max_batch_size!r}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise SpeculorError(f"prefill_chunk must be an integer ≥ 1, got {prefill_chunk!r}")
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.target_runner = sharded_runner or make_runner(
            self.target.model, runner, fixed_width=fixed_width, kernels=kernels, slots=max_batch_size
        )
        self.draft_runner = None
        if self.draft is not None:
            self.draft_runner = make_runner(self.draft.model, runner, kernels=kernels, slots=max_batch_size)
        # One EAGLE-3 proposer for the decoder's life: it holds the head's caches and has the target runner hand it
        # features, so every engine of this decoder shares it as they share the runners.
        self.eagle: Eagle3Proposer | None = None
        if eagle_head:
            head, layers = load_eagle3(draft, self.target.model)
            self.eagle = Eagle3Proposer(head, layers, self.target_runner, self.vocab_size)
        self._policy: LoadAwareGamma | None = None
        # False where one rank builds the requests and sends them whole to the others, its seeds drawn on its own
        # (`speculor serve`'s rank 0, speculor.server.replicas): a collective there would run beside the engine's.
        self.agree_on_seeds = True
        self.eos_ids = eos_token_ids(self.target.model)

    @property
    def speculative(self) -> bool:
        return self.draft is not None or self.eagle is not None or self.ngram is not None

    def _proposer(self) -> Proposer | None:
        if self.eagle is not None:
            return self.eagle
        if self.draft_runner is not None:
            assert self.draft is not None
            spec = ParallelDraftSpec.from_config(self.draft.model.config)
            if spec is not None:
                return ParallelDraftProposer(self.draft_runner, self.vocab_size, spec)
            return DraftModelProposer(self.draft_runner, self.vocab_size)
        if self.ngram is not None:
            return PromptLookupProposer(self.ngram, self.device)
        return None

    @property
    def auto_max_gamma(self) -> int:
        """The largest γ the load-aware policy considers: `AUTO_MAX_GAMMA`, or less under fixed-width steps."""
        return AUTO_MAX_GAMMA if self.fixed_width is None else min(AUTO_MAX_GAMMA, self.fixed_width - 1)

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

    def request(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        gamma: int | GammaPolicy | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        speculative: bool | None = None,
        logprobs: int | None = None,
        reproducible: bool | None = None,
        min_p: float = 0.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        logit_bias: Mapping[int, float] | None = None,
        min_tokens: int = 0,
        stop_token_ids: Sequence[int] = (),
        bad_words: Sequence[str | Sequence[int]] = (),
        structured: StructuredOutput | CompiledStructure | None = None,
    ) -> DecodeRequest:
        """A checked request, ready for an engine (`new_engine().add(...)`). `gamma=None` (the default) lets the
        engine choose γ each step for the whole batch from the step costs and acceptance it learns as it runs
        (`LoadAwareGamma`; 0 = no speculation under a heavy load); an int or a `GammaPolicy` fixes this request's
        own. `speculative=False` runs the target alone even when a draft is loaded (for baselines on the same
        runner). `logprobs=N` reports the target's log-probability of each token and its N best alternatives.
        `reproducible` (default: whether a seed is given) verifies a sampled request by drafter-invariant coupling,
        so its tokens are exactly the target alone's samples for its seed, whatever γ, draft or batch; False keeps
        the rejection rule, which accepts more drafts but whose tokens depend on what was drafted.

        `min_p`, the penalties, `logit_bias`, `min_tokens`, `stop_token_ids` and `bad_words` are as in
        `SamplingParams`; they are exact under speculation (the draft and the target see each drafted position's
        state). A bad word given as text is banned as the model spells it alone and after a space (the tokens
        differ).

        `structured` constrains the output to a JSON object, a JSON schema, a regex, a choice or an EBNF grammar
        (`speculor.grammar.StructuredOutput`), compiled once per structure for this tokenizer; the draft proposes
        only tokens the grammar allows and the target verifies under the same masks, so the output is the target
        alone's under the grammar. The row ends when the grammar is complete and the model picks EOS."""
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repetition_penalty=repetition_penalty,
            logit_bias=logit_bias or {},
            min_tokens=min_tokens,
            stop_token_ids=tuple(stop_token_ids),
            bad_words=self._bad_word_ids(bad_words),
            structured=self.compile_structure(structured),
        )
        if params.structured is not None and params.min_tokens:
            # A structure complete before min_tokens could go nowhere: the end is all it allows, and min_tokens bans it.
            raise SpeculorError("min_tokens cannot be combined with structured outputs: a complete structure must end")
        outside = sorted(token for token in params.token_ids() if token >= self.vocab_size)
        if outside:
            raise SpeculorError(f"token ids must be below the vocabulary size {self.vocab_size}; got {outside[:5]}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise SpeculorError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
        policy = gamma
        if isinstance(gamma, int):
            if isinstance(gamma, bool) or gamma < 1:
                raise SpeculorError(f"gamma must be an integer ≥ 1 (or None for the load-aware policy), got {gamma!r}")
            if self.fixed_width is not None and gamma + 1 > self.fixed_width:
                raise SpeculorError(
                    f"gamma {gamma} needs verify steps of {gamma + 1} tokens, more than fixed_width={self.fixed_width}"
                )
            policy = FixedGamma(gamma)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise SpeculorError(f"seed must be an integer, got {seed!r}")
        reproducible = seed is not None if reproducible is None else bool(reproducible)
        if seed is None and self.tensor_parallel is not None and self.agree_on_seeds:
            seed = agreed_seed(self.tensor_parallel)
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0):
            raise SpeculorError(f"logprobs must be an integer ≥ 0 (alternatives per token), got {logprobs!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) for s in stops):
            raise SpeculorError(f"stop must be a string or a list of strings, got {stop!r}")
        if stops and self.tokenizer is None:
            raise SpeculorError("stop strings need a tokenizer, and this model has none")
        prompt_ids = self.encode(prompt)
        self._check_length(len(prompt_ids), max_new_tokens)
        return DecodeRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            params=params,
            gamma=policy,
            eos_ids=self.eos_ids,
            stop=tuple(stops),
            ignore_eos=ignore_eos,
            seed=seed,
            max_gamma=self.fixed_width - 1 if self.fixed_width is not None else None,
            speculative=self.speculative if speculative is None else bool(speculative) and self.speculative,
            logprobs=logprobs,
            reproducible=reproducible,
        )

    def compile_structure(self, structured: StructuredOutput | CompiledStructure | None) -> CompiledStructure | None:
        """The structure compiled for this decoder's tokenizer (cached per tokenizer: `structure_compiler`). Raises
        `SpeculorError` naming what is wrong with a schema, regex or grammar that cannot be compiled."""
        if structured is None or isinstance(structured, CompiledStructure):
            return structured
        if not isinstance(structured, StructuredOutput):
            raise SpeculorError(f"structured must be a StructuredOutput, got {type(structured).__name__}")
        if self.tokenizer is None:
            raise SpeculorError("structured outputs need a tokenizer, and this model has none")
        return structure_compiler(self.tokenizer, self.vocab_size, self.eos_ids).compile(structured)

    def _bad_word_ids(self, bad_words: Sequence[str | Sequence[int]]) -> tuple[tuple[int, ...], ...]:
        """Bad words as token-id sequences: ids as given; text encoded alone and after a space, without special
        tokens (a word inside a sentence is usually spelled with its leading space)."""
        if isinstance(bad_words, str):
            raise SpeculorError(f"bad_words must be a list of words or token-id lists, got the string {bad_words!r}")
        words: list[tuple[int, ...]] = []
        for word in bad_words:
            if not isinstance(word, str):
                words.append(tuple(word))
                continue
            if self.tokenizer is None:
                raise SpeculorError("bad words given as text need a tokenizer, and this model has none")
            for spelling in (word, " " + word):
                ids = tuple(self.tokenizer.encode(spelling, add_special_tokens=False))
                if ids and ids not in words:
                    words.append(ids)
        return tuple(words)

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

    def new_engine(self) -> BatchEngine:
        """An engine over this decoder's runners, for request-level control (add, step, abort). The runners' slots
        are shared: step one engine of a decoder at a time. Its load-aware γ policy is the decoder's, so what it has
        learned of step costs and acceptance carries over from engine to engine."""
        return BatchEngine(
            self.target_runner,
            self._proposer(),
            self.vocab_size,
            self.tokenizer,
            load_aware=self._load_aware(),
            prefill_chunk=self.prefill_chunk,
        )

    def _load_aware(self) -> LoadAwareGamma:
        """The decoder's one load-aware policy: what it learns about step times and acceptance outlives an engine."""
        if self._policy is None:
            if self.tensor_parallel is None:
                self._policy = LoadAwareGamma(self.auto_max_gamma)
            else:
                self._policy = RankAgreedGamma(self.tensor_parallel, self.auto_max_gamma)
        return self._policy

    def decoding(self, prompt: str | Sequence[int], **options) -> Decoding:
        """A checked, ready-to-iterate generation of one prompt (options as in `request`)."""
        request = self.request(prompt, **options)
        return Decoding(self.new_engine(), request)

    def generate(
        self, prompt: str | Sequence[int] | Sequence[str | Sequence[int]], **options
    ) -> GenerationResult | list[GenerationResult]:
        """Generate a completion (options as in `request`): text, generated ids and statistics. Given a list of
        prompts (strings or token-id lists), returns a list of results in the same order, generated as a batch of up
        to `max_batch_size` rows at a time; rows that finish make room for the next prompts at once."""
        if isinstance(prompt, str) or not _is_prompt_list(prompt):
            decoding = self.decoding(prompt, **options)
            for _ in decoding:
                pass
            assert decoding.result is not None
            return decoding.result
        requests = [self.request(one, **options) for one in prompt]
        if not requests:
            raise SpeculorError("the list of prompts is empty")
        return run_batch(self.new_engine(), requests)

    def stream(self, prompt: str | Sequence[int], **options) -> Iterator[Delta]:
        """Yield `Delta`s (new token ids and new text) as tokens are accepted. Checks happen before the first yield."""
        decoding = self.decoding(prompt, **options)
        return iter(decoding)

    def warm_up(self, gamma: int | None = None) -> None:
        """Run every step shape that generations meet before the first request, so none pays for it: on CUDA the
        fast runner captures a graph per (batch bucket, width) and compiles Triton kernel variants on first use (in
        a GPU tuning run the first γ tried looked 7x slower than the rest, benchmarks/RESULTS.md). `gamma` is the
        largest fixed γ requests will use (default: the load-aware policy's largest). Nothing is timed here: the
        load-aware γ learns what steps cost from the steps themselves."""
        if gamma is not None and (not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1):
            raise SpeculorError(f"gamma must be an integer ≥ 1, got {gamma!r}")
        widest = max(gamma or 0, self.auto_max_gamma) + 1
        if self.fixed_width is not None:
            widest = min(widest, self.fixed_width)
        # The draft runner feeds one token a step, or two after a fully accepted step (see DraftModelProposer); a
        # parallel draft feeds the accepted tokens and masks (ParallelDraftProposer.step_widths).
        draft_widths = range(1, 3)
        if isinstance(proposer := self._proposer(), ParallelDraftProposer):
            draft_widths = proposer.step_widths(max(gamma or 0, self.auto_max_gamma))
        for runner, widths in ((self.target_runner, range(1, widest + 1)), (self.draft_runner, draft_widths)):
            if runner is None:
                continue
            if hasattr(runner, "warm_up"):
                runner.warm_up(list(widths))
            # Prompts of a new length can meet kernel variants not compiled yet (Triton specializes integer
            # arguments equal to 1 or divisible by 16): prefill lengths and starts of each kind once.
            runner.reset(0)
            for count in PREFILL_WARM_UP_LENGTHS:
                if runner.length(0) + count > runner.max_length:
                    break
                runner.extend(0, torch.zeros(count, dtype=torch.long, device=runner.device))
            runner.reset(0)


def _is_prompt_list(prompt: object) -> bool:
    """A list of prompts holds strings or id lists; a list of ints is one prompt."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and not isinstance(prompt[0], int)


def run_batch(engine: BatchEngine, requests: Sequence[DecodeRequest]) -> list[GenerationResult]:
    """Run `requests` on `engine` to completion, admitting them in order as slots free up; results in order."""
    results: list[GenerationResult | None] = [None] * len(requests)
    order: dict[int, int] = {}
    waiting = list(enumerate(requests))
    waiting.reverse()
    while waiting or engine.running:
        while waiting and engine.free_slots:
            index, request = waiting.pop()
            order[engine.add(request)] = index
        for event in engine.step():
            if event.result is not None:
                results[order.pop(event.request_id)] = event.result
    return [result for result in results if result is not None]


def generate(
    target: ModelSource, draft: ModelSource | None, prompt: str | Sequence[int], **options
) -> GenerationResult | list[GenerationResult]:
    """One-shot helper: load the pair (the `LOADER_OPTIONS` among `options` go to the loader), generate, return."""
    loader_options = {key: options.pop(key) for key in LOADER_OPTIONS if key in options}
    return SpeculativeDecoder(target, draft, **loader_options).generate(prompt, **options)
