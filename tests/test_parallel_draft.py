"""Parallel drafts (one draft forward proposes all γ tokens, PARD-style) keep speculative decoding exact: greedy
output equals the target alone on both runners, batched rows equal each row alone, sampled tokens are drawn from
the q handed to the verifier, and the draft's cache holds real tokens only after every proposal."""

from __future__ import annotations

import copy
import itertools
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build, tiny_llama_config
from fakes import TableRunner
from transformers import LlamaForCausalLM

import speculor
from speculor.adaptive import FixedGamma
from speculor.api import run_batch
from speculor.cli import main
from speculor.engine import BatchEngine, DecodeRequest
from speculor.proposers import (
    PARALLEL_DRAFT_KEY,
    DraftModelProposer,
    ParallelDraftProposer,
    ParallelDraftSpec,
    PromptLookupProposer,
)
from speculor.runners import make_runner
from speculor.sampling import DRAFT_STREAM, RowSampling, SamplingParams, counter_uniform, probabilities, sample
from speculor.train import DEFAULT_CPU_CORPUS_BYTES
from speculor.train_parallel import add_mask_token, cut_points, offset_positions, packed_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 96
MAX_GAMMA = 4
RUNNERS = ("hf", "fast")
PROMPTS = ([5, 17, 42, 8, 3], [60, 2, 2, 91, 30, 11, 7, 44], [1, 88])


def as_parallel_draft(model: LlamaForCausalLM, max_gamma: int = MAX_GAMMA) -> LlamaForCausalLM:
    """`model` with one more embedding row, the mask token, and the marker that makes it a parallel draft."""
    draft = copy.deepcopy(model)
    vocab = draft.config.vocab_size
    draft.resize_token_embeddings(vocab + 1, mean_resizing=False)
    setattr(draft.config, PARALLEL_DRAFT_KEY, ParallelDraftSpec(vocab, max_gamma).to_config())
    return draft


@pytest.fixture(scope="module")
def target() -> LlamaForCausalLM:
    return build(LlamaForCausalLM, tiny_llama_config(vocab_size=VOCAB, layers=2), seed=20, dtype=torch.float32)


@pytest.fixture(scope="module")
def noisy_draft(target) -> LlamaForCausalLM:
    """A perturbed copy of the target: its next-token guesses agree with the target's often, so drafts get
    accepted and both the accepted and the rejected paths run."""
    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.002)
    return as_parallel_draft(draft)


@pytest.fixture(scope="module")
def random_draft() -> LlamaForCausalLM:
    return as_parallel_draft(build(LlamaForCausalLM, tiny_llama_config(vocab_size=VOCAB, layers=1), 22, torch.float32))


def decoder_for(target, draft, runner: str, **options) -> speculor.SpeculativeDecoder:
    return speculor.SpeculativeDecoder(target, draft, device="cpu", dtype="float32", runner=runner, **options)


def test_marker_is_read_from_the_config_and_ordinary_drafts_have_none(noisy_draft, target):
    assert ParallelDraftSpec.from_config(noisy_draft.config) == ParallelDraftSpec(VOCAB, MAX_GAMMA)
    assert ParallelDraftSpec.from_config(target.config) is None


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("gamma", [1, 3, MAX_GAMMA, MAX_GAMMA + 2])
@pytest.mark.parametrize("draft_name", ["noisy_draft", "random_draft"])
def test_greedy_output_equals_the_target_alone(request, target, runner, gamma, draft_name):
    decoder = decoder_for(target, request.getfixturevalue(draft_name), runner)
    assert isinstance(decoder._proposer(), ParallelDraftProposer)
    for prompt in PROMPTS:
        alone = decoder.generate(prompt, max_new_tokens=24, speculative=False)
        speculative = decoder.generate(prompt, max_new_tokens=24, gamma=gamma)
        assert speculative.token_ids == alone.token_ids
        assert len(set(alone.token_ids)) > 5
        stats = speculative.stats
        assert stats.draft_forwards <= stats.target_forwards
        assert len(stats.drafted_by_position) <= MAX_GAMMA
        if draft_name == "noisy_draft" and gamma > 1:
            assert stats.accepted > 0 and stats.mean_accepted_length > 1.3


@pytest.mark.parametrize("runner", RUNNERS)
def test_batched_rows_of_different_gammas_equal_each_row_alone(target, noisy_draft, runner):
    decoder = decoder_for(target, noisy_draft, runner, max_batch_size=4)
    requests = [
        decoder.request(prompt, max_new_tokens=20 + 3 * index, gamma=gamma)
        for index, (prompt, gamma) in enumerate(zip([*PROMPTS, [9, 9, 4]], (1, 4, 2, 3), strict=True))
    ]
    together = run_batch(decoder.new_engine(), requests)
    for one, result in zip(requests, together, strict=True):
        alone = decoder.generate(one.prompt_ids, max_new_tokens=one.max_new_tokens, speculative=False)
        assert result.token_ids == alone.token_ids


@pytest.mark.parametrize("runner", RUNNERS)
def test_cache_keeps_only_real_tokens_and_proposals_equal_a_fresh_forward(noisy_draft, runner):
    """After each proposal the draft's cache holds exactly the context, and the next proposal (fed the accepted
    tokens plus masks on top of that cache) equals the draft run from scratch over context + masks: a mask left in
    the cache, or a token fed twice, would change it."""
    proposer = ParallelDraftProposer(make_runner(noisy_draft, runner, slots=2), VOCAB, ParallelDraftSpec(VOCAB, 4))
    greedy = RowSampling.build([SamplingParams()] * 2, [0, 0], torch.device("cpu"))
    contexts = [list(PROMPTS[0]), list(PROMPTS[1])]
    for slot in range(2):
        proposer.reset(slot)
    for grow, gammas in (([0, 0], [4, 2]), ([5, 1], [3, 4]), ([2, 3], [1, 4]), ([4, 5], [4, 4])):
        for context, count in zip(contexts, grow, strict=True):
            context.extend((context[-1] * 7 + offset) % VOCAB for offset in range(count))
        proposal = proposer.propose([0, 1], contexts, gammas, greedy, [None, None])
        assert proposal.forwards == 1 and proposal.counts.tolist() == gammas
        for slot, (context, gamma) in enumerate(zip(contexts, gammas, strict=True)):
            assert proposer.runner.length(slot) == len(context)
            fed = torch.tensor([context + [VOCAB] * (gamma - 1)])
            with torch.no_grad():
                fresh = noisy_draft(input_ids=fed).logits[0, len(context) - 1 :, :VOCAB].argmax(-1)
            assert proposal.tokens[slot, :gamma].tolist() == fresh.tolist()


def test_a_row_near_the_end_of_the_draft_context_steps_on_its_own(noisy_draft):
    """Padding a short row to a wide row's width would run past the fast runner's cache; such a row is stepped
    alone and its proposal is what it would be alone."""
    runner = make_runner(noisy_draft, "fast", slots=2, max_cache_length=24)
    proposer = ParallelDraftProposer(runner, VOCAB, ParallelDraftSpec(VOCAB, 4))
    greedy = RowSampling.build([SamplingParams()] * 2, [0, 0], torch.device("cpu"))
    long_context, short_context = list(range(1, 24)), [4, 8, 15, 16, 23]
    for slot in range(2):
        proposer.reset(slot)
    proposer.propose([0, 1], [long_context[:-5], short_context[:1]], [2, 2], greedy, [None, None])
    # Row 0 now lacks 5 tokens (as after 4 accepted drafts) and drafts 2: 18 cached + 6 fed fits the 24; row 1 lacks
    # 4 and drafts 4, so the step is 7 wide, and row 0 padded to it would not fit.
    together = proposer.propose([0, 1], [long_context, short_context], [2, 4], greedy, [None, None])
    assert [runner.length(0), runner.length(1)] == [len(long_context), len(short_context)]
    for slot, (context, gamma) in enumerate(((long_context, 2), (short_context, 4))):
        with torch.no_grad():
            fed = torch.tensor([context + [VOCAB] * (gamma - 1)])
            fresh = noisy_draft(input_ids=fed).logits[0, len(context) - 1 :, :VOCAB].argmax(-1)
        assert together.tokens[slot, :gamma].tolist() == fresh.tolist()


def test_sampled_tokens_are_drawn_from_the_returned_q(noisy_draft):
    """q must be exactly the law each token was drawn from: the returned q equals the draft's distribution at that
    offset (fresh forward, each row's own temperature and filters), and each token is the counter-based draw from
    it at position len(context) + i, the stream the sequential draft uses."""
    rows = 3
    proposer = ParallelDraftProposer(make_runner(noisy_draft, "hf", slots=rows), VOCAB, ParallelDraftSpec(VOCAB, 4))
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=20, top_p=0.9), SamplingParams()]
    sampling = RowSampling.build(params, [11, 12, 13], torch.device("cpu"))
    contexts = [list(prompt) for prompt in PROMPTS]
    for slot in range(rows):
        proposer.reset(slot)
    proposal = proposer.propose(list(range(rows)), contexts, [4, 3, 4], sampling, [None] * rows)
    assert proposal.probs is not None
    for row, (context, row_params, seed) in enumerate(zip(contexts, params, [11, 12, 13], strict=True)):
        gamma = int(proposal.counts[row])
        with torch.no_grad():
            logits = noisy_draft(input_ids=torch.tensor([context + [VOCAB] * (gamma - 1)])).logits[
                0, len(context) - 1 :
            ]
        expected_q = probabilities(logits[:, :VOCAB], row_params)
        torch.testing.assert_close(proposal.probs[row, :gamma], expected_q, atol=1e-5, rtol=1e-5)
        positions = torch.arange(len(context), len(context) + gamma)
        noise = counter_uniform(torch.tensor([seed] * gamma), positions, DRAFT_STREAM, VOCAB)
        assert proposal.tokens[row, :gamma].tolist() == sample(proposal.probs[row, :gamma], noise).tolist()
    assert len(set(proposal.tokens[:2].flatten().tolist())) > 3


SAMPLES, TABLE_VOCAB, NEW_TOKENS = 1500, 4, 5
# The engine's first step emits the target's token after the prompt; the second drafts 3 tokens in one parallel
# forward (γ = 3 = K): tokens 2 to 4, whose joint law this test checks.
DRAFTED = slice(1, 4)


def parallel_sampling_excess() -> float:
    """Pearson's statistic of the sampled (token 2, 3, 4) against their exact law under the target alone, enumerated
    on table-lookup models (tests/fakes.py; the draft's table has a fifth, mask, token), minus a bound far in the
    tail (df + 5·sqrt(2·df)); cells expected fewer than 5 times are pooled. Seeds are fixed: deterministic."""
    params, prompt = SamplingParams(temperature=1.0), [1, 2]
    target = TableRunner(TABLE_VOCAB, seed=0)
    exact: dict[tuple[int, ...], float] = {}
    for outcome in itertools.product(range(TABLE_VOCAB), repeat=NEW_TOKENS):
        probability, context = 1.0, list(prompt)
        for token in outcome:
            probability *= float(probabilities(target.logits_after(context), params)[token])
            context.append(token)
        exact[outcome[DRAFTED]] = exact.get(outcome[DRAFTED], 0.0) + probability
    draft = TableRunner(TABLE_VOCAB + 1, seed=1, sharpness=1.0, slots=8)
    proposer = ParallelDraftProposer(draft, TABLE_VOCAB, ParallelDraftSpec(TABLE_VOCAB, 3))
    engine = BatchEngine(TableRunner(TABLE_VOCAB, seed=0, slots=8), proposer, TABLE_VOCAB, None)
    requests = [DecodeRequest(prompt, NEW_TOKENS, params, FixedGamma(3), frozenset(), seed=s) for s in range(SAMPLES)]
    counts: dict[tuple[int, ...], int] = {}
    results = run_batch(engine, requests)
    assert sum(len(result.stats.accepted_by_position) == 3 for result in results) > 50
    for result in results:
        counts[tuple(result.token_ids[DRAFTED])] = counts.get(tuple(result.token_ids[DRAFTED]), 0) + 1
    statistic, pooled_expected, pooled_observed, cells = 0.0, 0.0, 0.0, 0
    for outcome, probability in exact.items():
        expected, observed = probability * SAMPLES, counts.get(outcome, 0)
        if expected < 5:
            pooled_expected, pooled_observed = pooled_expected + expected, pooled_observed + observed
        else:
            statistic += (observed - expected) ** 2 / expected
            cells += 1
    if pooled_expected:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        cells += 1
    degrees_of_freedom = cells - 1
    return statistic - (degrees_of_freedom + 5 * (2 * degrees_of_freedom) ** 0.5)


def test_speculative_sampling_with_a_parallel_draft_matches_the_target_distribution():
    assert parallel_sampling_excess() < 0


def test_a_wrong_q_is_caught(monkeypatch):
    """The same check fails when the proposal claims every offset was drawn from the first offset's q, which shows
    it has the power to catch a q that is not the law of the tokens."""
    propose = ParallelDraftProposer.propose

    def first_offsets_q_everywhere(self, *args, **kwargs):
        proposal = propose(self, *args, **kwargs)
        if proposal.probs is not None:
            proposal.probs = proposal.probs[:, :1].expand_as(proposal.probs).clone()
        return proposal

    monkeypatch.setattr(ParallelDraftProposer, "propose", first_offsets_q_everywhere)
    assert parallel_sampling_excess() > 0


def test_draft_passes_tell_the_policy_what_a_step_costs(noisy_draft, target):
    parallel = ParallelDraftProposer(make_runner(noisy_draft, "hf"), VOCAB, ParallelDraftSpec(VOCAB, MAX_GAMMA))
    sequential = DraftModelProposer(make_runner(target, "hf"), VOCAB)
    lookup = PromptLookupProposer(3, torch.device("cpu"))
    assert [parallel.draft_passes(gamma) for gamma in (0, 1, 4, 6)] == [0, 1, 1, 1]
    assert [sequential.draft_passes(gamma) for gamma in (0, 1, 4, 6)] == [0, 1, 4, 6]
    assert lookup.draft_passes(4) == 0
    assert list(parallel.step_widths(6)) == list(range(1, 2 * MAX_GAMMA + 1))


def test_a_parallel_draft_one_logit_wider_pairs_with_its_target_without_tokenizers(target, noisy_draft):
    decoder = decoder_for(target, noisy_draft, "hf")
    assert decoder.vocab_size == VOCAB
    with pytest.raises(speculor.SpeculorError, match="same size"):
        decoder_for(target, build(LlamaForCausalLM, tiny_llama_config(vocab_size=VOCAB + 1), 23), "hf")


def test_packed_training_forward_equals_one_forward_per_cut_point(noisy_draft):
    """PARD's attention-mask trick: in one packed forward each block of masks sees only its cut's context and its
    own earlier masks, so its logits equal those of the context + masks run alone (what the proposer feeds)."""
    windows = torch.tensor([[(7 * index + 3 * row) % VOCAB for index in range(20)] for row in range(2)])
    cuts = cut_points(20, MAX_GAMMA, 5, torch.Generator().manual_seed(0))
    input_ids, positions, allowed = packed_inputs(windows, cuts, MAX_GAMMA, VOCAB)
    draft = copy.deepcopy(noisy_draft).to(torch.float64)
    with torch.no_grad():
        packed = draft(input_ids=input_ids, position_ids=positions, attention_mask=allowed).logits
        plain = draft(input_ids=windows).logits
    pairs = offset_positions(20, cuts, MAX_GAMMA)
    torch.testing.assert_close(packed[:, pairs[0][0]], plain[:, :19])
    for row in range(2):
        for cut_index, cut in enumerate(cuts.tolist()):
            fed = torch.cat([windows[row, : cut + 1], torch.full((MAX_GAMMA - 1,), VOCAB)])
            with torch.no_grad():
                alone = draft(input_ids=fed[None]).logits[0, cut:]
            for offset, (packed_at, answer_at) in enumerate(pairs):
                index = cut if offset == 0 else packed_at[cut_index]
                assert offset == 0 or answer_at[cut_index] == cut + offset
                torch.testing.assert_close(packed[row, index], alone[offset])


def test_adding_the_mask_token_keeps_the_vocabulary_and_marks_the_config(target):
    model = copy.deepcopy(target)
    spec = add_mask_token(model, 5)
    assert spec == ParallelDraftSpec(VOCAB, 5) == ParallelDraftSpec.from_config(model.config)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == VOCAB + 1
    torch.testing.assert_close(model.get_input_embeddings().weight[:VOCAB], target.get_input_embeddings().weight)


def test_train_parallel_end_to_end_writes_a_draft_speculor_detects(text_pair_dirs, tmp_path, capsys):
    """A few steps from the command line on a small corpus: it says what it reads (at most the CPU's default cap,
    as `speculor train` does) and how long it trains before it starts; the saved draft is one embedding row wider,
    marked, carries a model card with per-offset agreement, and decodes exactly like the target alone."""
    target_dir, draft_dir = text_pair_dirs
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("engine.py", "verify.py", "sampling.py", "proposers.py"):
        shutil.copy(Path(speculor.__file__).parent / name, corpus / name)
    output = tmp_path / "parallel"
    argv = ["train-parallel", "--output", str(output), "--init-from", str(draft_dir), "--distill-from"]
    argv += [str(target_dir), "--parallel", "3", "--corpus", str(corpus), "--steps", "3", "--batch-size", "2"]
    argv += ["--sequence-length", "32", "--cuts", "4", "--threads", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "3 steps\theld-out top-1 by offset" in printed.out
    cap_megabytes = DEFAULT_CPU_CORPUS_BYTES / 1e6
    assert f"corpus: reading .py files, at most {cap_megabytes:g} MB" in printed.err
    assert "training: " in printed.err and "3 steps of 2 windows × 32 tokens" in printed.err
    config = (output / "config.json").read_text()
    assert f'"{PARALLEL_DRAFT_KEY}"' in config
    card = (output / "README.md").read_text()
    assert "speculor train-parallel --output" in card and "top-1 agreement" in card
    decoder = speculor.SpeculativeDecoder(target_dir, output, device="cpu")
    assert isinstance(decoder._proposer(), ParallelDraftProposer)
    assert decoder.draft.logits_width == decoder.vocab_size + 1
    alone = decoder.generate("def f(x):\n", max_new_tokens=16, speculative=False, ignore_eos=True)
    speculative = decoder.generate("def f(x):\n", max_new_tokens=16, gamma=3, ignore_eos=True)
    assert speculative.token_ids == alone.token_ids and len(set(alone.token_ids)) > 3


def test_the_shipped_parallel_draft_is_listed_detected_and_exact():
    from speculor.models import PARALLEL_DRAFTS, shipped

    family = shipped()
    assert list(family.parallel_drafts) == list(PARALLEL_DRAFTS)
    decoder = speculor.SpeculativeDecoder(family.target, family.parallel_drafts[PARALLEL_DRAFTS[0]], device="cpu")
    assert isinstance(decoder._proposer(), ParallelDraftProposer) and decoder.vocab_size == 8192
    prompt = 'def flatten(nested):\n    """Return a flat list of the items of a list of lists."""\n'
    alone = decoder.generate(prompt, max_new_tokens=32, speculative=False, ignore_eos=True)
    speculative = decoder.generate(prompt, max_new_tokens=32, gamma=4, ignore_eos=True)
    assert speculative.token_ids == alone.token_ids
    assert speculative.stats.target_forwards < alone.stats.target_forwards
