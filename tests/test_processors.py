"""Penalties, logit bias, min-p, min_tokens, stop token ids and bad words are exact under speculation.

A processor's state at drafted position i depends on the tokens drafted before it; the engine must give the draft
and the target, at every position, the state the target alone would have after the same prefix. Checked against
references written apart from the engine (tests/exact_reference.py: processors in plain Python, one token at a
time, over the whole context; filtering by transformers' warpers):
- greedy, token for token, per row of mixed batches, against plain greedy decoding of the Hugging Face target with
  the processors applied (float32, a draft whose drafts are partly accepted, several γ);
- sampled, in distribution, against the exact enumeration over a 4-token vocabulary, with a deliberately wrong
  engine (the penalty state not advanced by the drafted prefix) shown to fail the same test;
- seeded rows, identical to the target alone's sample for the seed.
The state the engine keeps from step to step (`ProcessorState`: counts advanced by each step's tokens, parts kept
while the rows stay) equals `RowProcessors.build` from the whole contexts after every step, as rows join and leave;
a state that skips or recounts tokens is shown to fail that check.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch
from exact_reference import processed_logits, warped_probabilities
from fakes import TableRunner
from test_parallel_draft import as_parallel_draft
from test_sampling_exactness import SAMPLES, chi_square_excess

from speculor import SpeculativeDecoder, SpeculorError
from speculor import processors as processors_module
from speculor.adaptive import FixedGamma
from speculor.api import run_batch
from speculor.engine import BatchEngine, DecodeRequest, _end_ids
from speculor.processors import ProcessorState, RowProcessors
from speculor.proposers import DraftModelProposer, PromptLookupProposer
from speculor.sampling import SamplingParams

NEW_TOKENS = 16
EOS = 7
# Options whose effects show in a few tokens of a 96-token random model: each case changes the target's output.
GREEDY_OPTIONS = [
    dict(repetition_penalty=1.8),
    dict(presence_penalty=1.5, frequency_penalty=0.7),
    dict(logit_bias={5: 3.0, 11: 2.5, 40: -100.0}),
    dict(min_tokens=10, stop_token_ids=[3, 9]),
    dict(bad_words=[[17], [60, 61], [2, 8, 30]], frequency_penalty=2.0),
    dict(repetition_penalty=0.7, presence_penalty=-1.0, logit_bias={1: 1.0}),
    {},
]


@pytest.fixture(scope="module")
def decoder(float32_pair):
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, draft, dtype=torch.float32, max_batch_size=8)
    decoder.eos_ids = frozenset({EOS})
    return decoder


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(96) for _ in range(rng.randint(3, 12))] for _ in range(count)]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], params: SamplingParams, max_new_tokens: int) -> list[int]:
    """The target alone: a full forward over the context for every token, the processors applied, then argmax;
    EOS and the stop token ids end it (kept)."""
    generated: list[int] = []
    end_ids = frozenset({EOS}) | frozenset(params.stop_token_ids)
    while len(generated) < max_new_tokens:
        logits = model(torch.tensor([[*prompt, *generated]])).logits[0, -1].float()
        token = int(processed_logits(logits, prompt, generated, params, end_ids).argmax())
        generated.append(token)
        if token in end_ids:
            break
    return generated


def test_greedy_rows_with_mixed_options_equal_the_target_alone(decoder, float32_pair):
    target, _ = float32_pair
    cases = prompts(len(GREEDY_OPTIONS), seed=1)
    requests = [
        decoder.request(prompt, max_new_tokens=NEW_TOKENS, gamma=1 + index % 4, **options)
        for index, (prompt, options) in enumerate(zip(cases, GREEDY_OPTIONS, strict=True))
    ]
    results = run_batch(decoder.new_engine(), requests)
    plain = reference_greedy(target, cases[0], SamplingParams(), NEW_TOKENS)
    for request, result in zip(requests, results, strict=True):
        expected = reference_greedy(target, request.prompt_ids, request.params, NEW_TOKENS)
        assert result.token_ids == expected
    assert sum(result.stats.accepted for result in results) > 0
    assert sum(result.stats.drafted - result.stats.accepted for result in results) > 0, "some drafts rejected"
    assert len(set(plain)) > 3, "a degenerate target proves nothing"
    penalised = reference_greedy(target, cases[0], requests[0].params, NEW_TOKENS)
    assert penalised != plain, "the options must change the output"


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_each_option_alone_is_exact_at_every_gamma(decoder, float32_pair, gamma):
    target, _ = float32_pair
    prompt = prompts(1, seed=2)[0]
    for options in GREEDY_OPTIONS[:-1]:
        result = decoder.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=gamma, **options)
        params = decoder.request(prompt, **options).params
        assert result.token_ids == reference_greedy(target, prompt, params, NEW_TOKENS), options


def test_min_tokens_holds_back_the_end_and_stop_token_ids_end(decoder):
    prompt = prompts(1, seed=3)[0]
    free = decoder.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=2, logit_bias={EOS: 100.0})
    assert free.token_ids == [EOS] and free.finish_reason == "eos"
    held = decoder.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=2, logit_bias={EOS: 100.0}, min_tokens=5)
    assert held.token_ids[-1] == EOS and len(held.token_ids) == 6
    stopped = decoder.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=2, logit_bias={4: 100.0}, stop_token_ids=[4])
    assert stopped.token_ids == [4] and stopped.finish_reason == "stop"


def test_prompt_lookup_drafts_are_verified_with_the_processors(float32_pair):
    target, _ = float32_pair
    lookup = SpeculativeDecoder(target, ngram=2, dtype=torch.float32)
    lookup.eos_ids = frozenset({EOS})
    prompt = [4, 5, 6, 4, 5, 6, 4, 5]
    # The bias keeps the output among the prompt's tokens, so the lookup finds drafts; the ban and the penalty decide
    # which of them the target takes.
    options = dict(logit_bias={4: 4.0, 5: 4.0, 6: 4.0}, frequency_penalty=0.3, bad_words=[[5, 6]])
    result = lookup.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=3, **options)
    params = lookup.request(prompt, **options).params
    assert result.token_ids == reference_greedy(target, prompt, params, NEW_TOKENS)
    assert result.stats.accepted > 0 and result.stats.drafted > result.stats.accepted


def test_a_parallel_draft_draws_its_tokens_in_turn_under_the_processors(float32_pair):
    """A parallel draft reads all γ distributions in one forward, but its q for token i depends on the tokens drawn
    before it once processors are on; greedy and seeded rows stay the target alone's."""
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, as_parallel_draft(draft), dtype=torch.float32, max_batch_size=4)
    decoder.eos_ids = frozenset({EOS})
    cases = prompts(3, seed=7)
    requests = [
        decoder.request(cases[0], max_new_tokens=NEW_TOKENS, gamma=3, repetition_penalty=1.8, bad_words=[[60, 61]]),
        decoder.request(cases[1], max_new_tokens=NEW_TOKENS, gamma=4, frequency_penalty=1.5, logit_bias={5: 2.0}),
        decoder.request(cases[2], max_new_tokens=NEW_TOKENS, gamma=2, temperature=1.0, seed=4, presence_penalty=1.0),
    ]
    results = run_batch(decoder.new_engine(), requests)
    for request, result in zip(requests[:2], results[:2], strict=True):
        assert result.token_ids == reference_greedy(target, request.prompt_ids, request.params, NEW_TOKENS)
    seeded = decoder.generate(
        cases[2], max_new_tokens=NEW_TOKENS, speculative=False, temperature=1.0, seed=4, presence_penalty=1.0
    )
    assert results[2].token_ids == seeded.token_ids
    assert sum(result.stats.accepted for result in results) > 0


def test_seeded_rows_equal_the_target_alones_sample(decoder):
    options = dict(
        max_new_tokens=20, temperature=1.0, seed=11, presence_penalty=0.8, repetition_penalty=1.3, min_p=0.05
    )
    prompt = prompts(1, seed=4)[0]
    alone = decoder.generate(prompt, speculative=False, **options).token_ids
    for gamma in (1, 3, 5):
        assert decoder.generate(prompt, gamma=gamma, **options).token_ids == alone
    crowd = [decoder.request(other, max_new_tokens=9, gamma=2, temperature=0.8, seed=3) for other in prompts(3, 5)]
    results = run_batch(decoder.new_engine(), [crowd[0], decoder.request(prompt, gamma=2, **options), *crowd[1:]])
    assert results[1].token_ids == alone
    assert len(set(alone)) > 5, "a degenerate model proves nothing"


def test_rows_without_options_are_unchanged_beside_rows_with_them(decoder):
    cases = prompts(3, seed=6)
    plain = [decoder.generate(prompt, max_new_tokens=NEW_TOKENS, gamma=3).token_ids for prompt in cases]
    requests = [
        decoder.request(cases[0], max_new_tokens=NEW_TOKENS, gamma=3),
        decoder.request(cases[1], max_new_tokens=NEW_TOKENS, gamma=3, repetition_penalty=2.0),
        decoder.request(cases[2], max_new_tokens=NEW_TOKENS, gamma=3),
    ]
    results = run_batch(decoder.new_engine(), requests)
    assert [results[0].token_ids, results[2].token_ids] == [plain[0], plain[2]]
    assert results[1].token_ids != plain[1]


def test_out_of_range_options_are_refused(decoder):
    for options in (
        dict(presence_penalty=2.5),
        dict(repetition_penalty=0.0),
        dict(min_p=1.5),
        dict(logit_bias={3: 200.0}),
        dict(logit_bias={500: 1.0}),
        dict(min_tokens=-1),
        dict(stop_token_ids=[96]),
        dict(bad_words=[[]]),
    ):
        with pytest.raises(SpeculorError):
            decoder.request([1, 2, 3], **options)


# The sampled test: a 4-token vocabulary whose every 4-token outcome is enumerated exactly.
VOCAB = 4
PROMPT = [1, 2]
SAMPLED_TOKENS = 4
BATCH = 8
SAMPLED_SETTINGS = [
    (SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=1.0, repetition_penalty=1.5), 3),
    (SamplingParams(temperature=0.8, min_p=0.2, logit_bias={0: 1.5, 3: -1.0}, bad_words=((1, 1), (2, 0))), 2),
]


def exact_distribution(params: SamplingParams) -> dict[tuple[int, ...], float]:
    target = TableRunner(VOCAB, seed=0)
    result = {}
    for outcome in itertools.product(range(VOCAB), repeat=SAMPLED_TOKENS):
        probability = 1.0
        for index, token in enumerate(outcome):
            generated = list(outcome[:index])
            logits = processed_logits(target.logits_after(PROMPT + generated), PROMPT, generated, params, frozenset())
            probability *= float(warped_probabilities(logits, params)[token])
        result[outcome] = probability
    return result


def empirical_distribution(params: SamplingParams, gamma: int) -> dict[tuple[int, ...], float]:
    target = TableRunner(VOCAB, seed=0, slots=BATCH)
    draft = TableRunner(VOCAB, seed=1, sharpness=2.5, slots=BATCH)
    engine = BatchEngine(target, DraftModelProposer(draft, VOCAB), VOCAB, None)
    requests = [
        DecodeRequest(PROMPT, SAMPLED_TOKENS, params, FixedGamma(gamma), frozenset(), seed=seed)
        for seed in range(SAMPLES)
    ]
    counts: dict[tuple[int, ...], int] = {}
    for result in run_batch(engine, requests):
        outcome = tuple(result.token_ids)
        counts[outcome] = counts.get(outcome, 0) + 1
    return {outcome: count / SAMPLES for outcome, count in counts.items()}


@pytest.mark.parametrize(("params", "gamma"), SAMPLED_SETTINGS)
def test_sampled_options_follow_the_target_alones_distribution(params, gamma):
    assert chi_square_excess(exact_distribution(params), empirical_distribution(params, gamma)) < 0


def test_a_processor_blind_to_the_drafted_prefix_is_caught(monkeypatch):
    """Wrong on purpose: every position sees the state after the committed tokens only, as if nothing had been
    drafted before it (the mistake of a verifier that processes γ positions with one state)."""
    original = RowProcessors.apply

    def blind(self, logits, drafted, offset=0):
        return torch.cat(
            [original(self, logits[:, j : j + 1], drafted[:, :0], 0) for j in range(logits.shape[1])], dim=1
        )

    monkeypatch.setattr(RowProcessors, "apply", blind)
    params, gamma = SAMPLED_SETTINGS[0]
    assert chi_square_excess(exact_distribution(params), empirical_distribution(params, gamma)) > 0


def test_a_seeded_row_drafted_by_lookup_keeps_the_target_alones_sample():
    """A proposer that draws from no distribution (the lookup: q one-hot) with a sampled, processed, seeded row."""
    params = SamplingParams(temperature=1.0, frequency_penalty=1.0, bad_words=((2, 1),))
    request = DecodeRequest([1, 2, 3, 1, 2, 3, 1], 12, params, FixedGamma(2), frozenset(), seed=1, reproducible=True)
    lookup = BatchEngine(TableRunner(VOCAB, seed=0), PromptLookupProposer(2, torch.device("cpu")), VOCAB, None)
    alone = BatchEngine(TableRunner(VOCAB, seed=0), None, VOCAB, None)
    drafted = run_batch(lookup, [request])[0]
    assert drafted.token_ids == run_batch(alone, [request])[0].token_ids
    assert drafted.stats.drafted > 0


def test_looking_ahead_is_skipped_for_batches_with_processors_and_changes_no_token(decoder, monkeypatch):
    """Rows with processors build their state from the host's contexts each step, so a batch holding one is never
    queued ahead (target-alone rows, which otherwise would be); with look-ahead forced on, every row's tokens are
    those of the plain order."""
    cases = prompts(3, seed=8)
    options = [dict(repetition_penalty=1.7), {}, dict(temperature=0.9, seed=2, min_p=0.1)]
    requests = [
        decoder.request(prompt, max_new_tokens=NEW_TOKENS, speculative=False, **option)
        for prompt, option in zip(cases, options, strict=True)
    ]
    plain = run_batch(decoder.new_engine(), requests)
    original = BatchEngine._queue_ahead
    queued_ahead = []

    def spy(self, *arguments):
        queued_ahead.append(arguments)
        return original(self, *arguments)

    monkeypatch.setattr(BatchEngine, "_queue_ahead", spy)

    def run_ahead(batch):
        engine = decoder.new_engine()
        engine.look_ahead = True
        return run_batch(engine, batch)

    ahead = run_ahead(requests)
    assert [result.token_ids for result in ahead] == [result.token_ids for result in plain]
    assert not queued_ahead
    run_ahead([requests[1]])
    assert queued_ahead, "the same engine looks ahead for a row without processors"


# Rows that join and leave a running batch: penalties, bias, min_tokens and banned words of several lengths, beside
# rows without options.
CHURN_OPTIONS = [
    dict(repetition_penalty=1.6, logit_bias={5: 2.0, 40: -3.0}),
    dict(presence_penalty=1.0, frequency_penalty=0.5, min_tokens=6),
    {},
    dict(bad_words=[[17], [60, 61], [2, 8, 30]], frequency_penalty=1.2),
    dict(logit_bias={EOS: 4.0}, min_tokens=4),
    dict(repetition_penalty=0.8, bad_words=[[11, 12]], logit_bias={11: 2.0}),
]


def state_differences(actual: RowProcessors, expected: RowProcessors) -> list[str]:
    """The fields in which two processors differ: tensors exactly (dtype and shape too), the banned continuations
    entry by entry, grammars by identity."""

    def same(a, b) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())

    differences = []
    for field in dataclasses.fields(RowProcessors):
        a, b = getattr(actual, field.name), getattr(expected, field.name)
        if field.name == "banned_continuations":
            equal = len(a) == len(b) and all(
                same(x.rows, y.rows) and same(x.prefixes, y.prefixes) and same(x.banned, y.banned)
                for x, y in zip(a, b, strict=True)
            )
        elif field.name == "grammars":
            equal = (a is None and b is None) or (a is not None and b is not None and a.rows == b.rows)
        else:
            equal = same(a, b)
        if not equal:
            differences.append(field.name)
    return differences


def run_checking_the_state(monkeypatch, engine: BatchEngine, requests: list[DecodeRequest]):
    """Run the requests, admitted as slots free up (rows join and leave mid-run); at every step with processors,
    compare the processors the engine keeps with `RowProcessors.build` from the rows' whole contexts. Returns the
    results and, per such step, the rows' request ids and the fields that differed."""
    original = BatchEngine._processors
    steps: list[tuple[tuple[int, ...], list[str]]] = []

    def checked(self, rows):
        kept = original(self, rows)
        rebuilt = RowProcessors.build(
            [row.request.params for row in rows],
            [row.request.prompt_ids for row in rows],
            [row.generated for row in rows],
            [_end_ids(row.request) for row in rows],
            self.vocab_size,
            self.device,
        )
        steps.append((tuple(row.request_id for row in rows), state_differences(kept, rebuilt)))
        return kept

    monkeypatch.setattr(BatchEngine, "_processors", checked)
    return run_batch(engine, requests), steps


def churning_requests(decoder) -> list:
    cases = prompts(12, seed=9)
    return [
        decoder.request(
            prompt,
            max_new_tokens=6 + (5 * index) % 17,
            gamma=1 + index % 4,
            **CHURN_OPTIONS[index % len(CHURN_OPTIONS)],
        )
        for index, prompt in enumerate(cases)
    ]


def test_the_kept_state_equals_a_rebuild_after_every_step_as_rows_join_and_leave(float32_pair, monkeypatch):
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, draft, dtype=torch.float32, max_batch_size=4)
    decoder.eos_ids = frozenset({EOS})
    requests = churning_requests(decoder)
    results, steps = run_checking_the_state(monkeypatch, decoder.new_engine(), requests)
    assert [differences for _, differences in steps if differences] == []
    for request, result in zip(requests, results, strict=True):
        assert result.token_ids == reference_greedy(target, request.prompt_ids, request.params, request.max_new_tokens)
    # Both ways the state moves on were taken many times: the same rows again (counts advanced in place), and new
    # rows beside rows that stayed (their state carried over).
    pairs = list(itertools.pairwise(keys for keys, _ in steps))
    assert sum(before == after for before, after in pairs) >= 10
    assert sum(before != after and bool(set(before) & set(after)) for before, after in pairs) >= 5
    assert sum(bool(set(after) - set(before)) and bool(set(before) & set(after)) for before, after in pairs) >= 3
    assert any(result.finish_reason == "eos" for result in results)


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(lambda output, counted: [], id="new-tokens-not-counted"),
        pytest.param(lambda output, counted: list(output), id="whole-output-counted-again"),
    ],
)
def test_a_state_that_miscounts_the_committed_tokens_is_caught(float32_pair, monkeypatch, broken):
    """Wrong on purpose: the tokens a row committed since the last step are skipped, or its whole output is added
    again each step; the comparison with a rebuild must see it in the output counts."""
    target, draft = float32_pair
    decoder = SpeculativeDecoder(target, draft, dtype=torch.float32, max_batch_size=4)
    decoder.eos_ids = frozenset({EOS})
    monkeypatch.setattr(processors_module, "_tokens_since", broken)
    _, steps = run_checking_the_state(monkeypatch, decoder.new_engine(), churning_requests(decoder))
    assert any("output_counts" in differences for _, differences in steps)


def test_the_kept_state_follows_reordered_shrinking_and_growing_row_sets():
    """`ProcessorState` alone against `RowProcessors.build`, over random row sets: rows join, leave and change
    places, outputs grow by 0 to 4 tokens, batches with and without penalties alternate."""
    vocab = 30
    rng = random.Random(0)
    choices = [
        dict(repetition_penalty=1.3),
        dict(presence_penalty=0.5, logit_bias={3: 1.0, 4: -2.0, 29: 0.5}),
        dict(min_tokens=4),
        dict(bad_words=[[5], [6, 7], [1, 2, 3]]),
        {},
        dict(frequency_penalty=1.0, bad_words=[[9, 9]]),
    ]
    state = ProcessorState()
    rows: dict[int, tuple[SamplingParams, list[int], list[int], frozenset[int]]] = {}
    for key in range(300):
        if rows and rng.random() < 0.3:
            del rows[rng.choice(list(rows))]
        if len(rows) < rng.randint(1, 6):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 9))]
            rows[key] = (SamplingParams(**rng.choice(choices)), prompt, [], frozenset({0, rng.randrange(vocab)}))
        for _, _, output, _ in rows.values():
            output.extend(rng.randrange(vocab) for _ in range(rng.randint(0, 4)))
        keys = list(rows)
        if rng.random() < 0.3:
            rng.shuffle(keys)
        arguments = [[rows[key][part] for key in keys] for part in range(4)]
        kept = state.update(keys, *arguments, vocab, torch.device("cpu"))
        assert state_differences(kept, RowProcessors.build(*arguments, vocab, torch.device("cpu"))) == []
