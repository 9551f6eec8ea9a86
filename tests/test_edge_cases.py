"""Edge cases of the loop: short budgets, EOS inside an accepted run, stop strings, cache resync after a bonus."""

from __future__ import annotations

import pytest
import torch

from speculor import SpeculativeDecoder, SpeculorError


@pytest.fixture(scope="module")
def self_drafting(llama_pair):
    target = llama_pair[0]
    return SpeculativeDecoder(target, dtype=torch.float64), SpeculativeDecoder(target, target, dtype=torch.float64)


def test_max_new_tokens_below_gamma(llama_pair):
    target, draft = llama_pair
    baseline = SpeculativeDecoder(target, dtype=torch.float64)
    speculative = SpeculativeDecoder(target, draft, dtype=torch.float64)
    for max_new_tokens in (1, 2, 3):
        result = speculative.generate([5, 6, 7], max_new_tokens=max_new_tokens, gamma=8, ignore_eos=True)
        assert len(result.token_ids) == max_new_tokens
        assert result.token_ids == baseline.generate([5, 6, 7], max_new_tokens=max_new_tokens).token_ids


def test_eos_inside_an_accepted_run_stops_there_and_is_kept(self_drafting):
    baseline, speculative = self_drafting
    free_run = baseline.generate([3, 1, 4], max_new_tokens=20, ignore_eos=True).token_ids
    eos = free_run[5]
    cut = free_run.index(eos) + 1
    baseline.eos_ids = speculative.eos_ids = frozenset({eos})
    try:
        result = speculative.generate([3, 1, 4], max_new_tokens=20, gamma=8)
        assert result.token_ids == free_run[:cut]
        assert result.finish_reason == "eos"
        assert baseline.generate([3, 1, 4], max_new_tokens=20).token_ids == free_run[:cut]
        assert speculative.generate([3, 1, 4], max_new_tokens=20, gamma=8, ignore_eos=True).token_ids == free_run
    finally:
        baseline.eos_ids = speculative.eos_ids = frozenset()


class FlipAt:
    """Wraps a draft runner and turns its prediction for one absolute position into the argmin, forcing exactly
    one rejection there."""

    def __init__(self, inner, position: int) -> None:
        self.inner = inner
        self.position = position

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, slots, token_ids: torch.Tensor) -> torch.Tensor:
        starts = [self.inner.length(slot) for slot in slots]
        logits = self.inner.step(slots, token_ids).clone()
        for row, start in enumerate(starts):
            for column in range(token_ids.shape[1]):
                if start + column + 1 == self.position:
                    logits[row, column] = -logits[row, column]
        return logits


def test_bonus_path_then_rejection_resyncs_the_draft_cache(self_drafting):
    baseline, speculative = self_drafting
    prompt = [9, 8, 7, 6]
    original = speculative.draft_runner
    speculative.draft_runner = FlipAt(original, position=len(prompt) + 7)
    try:
        result = speculative.generate(prompt, max_new_tokens=15, gamma=4, ignore_eos=True)
    finally:
        speculative.draft_runner = original
    assert result.token_ids == baseline.generate(prompt, max_new_tokens=15, ignore_eos=True).token_ids
    # Steps: the target's first token alone (0); 4 drafts all kept + bonus (1–5); drafts for 6–9 with 7 flipped:
    # 1 kept, target's 7 emitted; 4 drafts kept + bonus (8–12); one draft kept + bonus (13–14). Any resync error
    # would cost more rejections.
    assert (result.stats.drafted, result.stats.accepted, result.stats.target_forwards) == (13, 10, 5)
    assert result.stats.accepted_by_position == [4, 2, 2, 2]
    assert result.stats.drafted_by_position == [4, 3, 3, 3]


@pytest.fixture(scope="module")
def text_decoder(text_pair_dirs):
    target, draft = text_pair_dirs
    return SpeculativeDecoder(str(target), str(draft), dtype="float32")


def test_stop_string_split_across_tokens(text_decoder):
    prompt = "def add(a, b):\n"
    free = text_decoder.generate(prompt, max_new_tokens=40, ignore_eos=True)
    tokenizer = text_decoder.tokenizer
    for index in range(1, len(free.token_ids)):
        boundary = len(tokenizer.decode(free.token_ids[:index]))
        stop = free.text[boundary - 1 : boundary + 1]
        if len(stop) == 2 and free.text.find(stop) == boundary - 1:
            break
    else:
        pytest.skip("no token boundary with a unique two-character string in this completion")
    deltas = list(text_decoder.stream(prompt, max_new_tokens=40, ignore_eos=True, stop=[stop]))
    streamed = "".join(delta.text for delta in deltas)
    result = text_decoder.generate(prompt, max_new_tokens=40, ignore_eos=True, stop=stop)
    assert result.text == free.text[: boundary - 1] == streamed
    assert result.finish_reason == "stop"
    assert result.token_ids == free.token_ids[: index + 1]


def test_stream_concatenates_to_the_result(text_decoder):
    prompt = "for item in items:\n"
    deltas = list(text_decoder.stream(prompt, max_new_tokens=30, gamma=3, ignore_eos=True))
    result = text_decoder.generate(prompt, max_new_tokens=30, gamma=3, ignore_eos=True)
    assert "".join(d.text for d in deltas) == result.text
    assert [t for d in deltas for t in d.token_ids] == result.token_ids
    assert len(deltas) == result.stats.target_forwards


def test_statistics_are_consistent(text_decoder):
    stats = text_decoder.generate("import os\n", max_new_tokens=30, gamma=4, ignore_eos=True).stats
    assert stats.new_tokens == 30
    assert stats.drafted == sum(stats.drafted_by_position)
    assert stats.accepted == sum(stats.accepted_by_position)
    assert stats.acceptance_rate == pytest.approx(stats.accepted / stats.drafted)
    assert stats.mean_accepted_length == pytest.approx(30 / stats.target_forwards)
    assert stats.draft_forwards >= stats.drafted
    assert 0 < stats.time_to_first_token <= stats.wall_seconds
    assert stats.draft_seconds + stats.verify_seconds <= stats.wall_seconds
    assert set(stats.to_dict()) >= {"acceptance_rate", "mean_accepted_length", "tokens_per_second", "other_seconds"}


@pytest.mark.parametrize("fixed_width", [None, 3])
def test_warm_up_runs_every_step_width_and_changes_no_output(llama_pair, fixed_width):
    target, draft = llama_pair
    fresh = SpeculativeDecoder(target, draft, dtype=torch.float64, runner="fast", fixed_width=fixed_width)
    expected = fresh.generate([5, 3, 8], max_new_tokens=12, gamma=2, ignore_eos=True).token_ids
    warmed = SpeculativeDecoder(target, draft, dtype=torch.float64, runner="fast", fixed_width=fixed_width)
    widths: list[list[int]] = []
    warm_up = warmed.target_runner.warm_up

    def recording_warm_up(step_widths: list[int]) -> None:
        widths.append(list(step_widths))
        warm_up(step_widths)

    warmed.target_runner.warm_up = recording_warm_up
    warmed.warm_up(4)
    # Every width a fixed γ = 4 or the load-aware policy (up to γ = 6) can need, capped by fixed-width steps.
    assert widths == ([[1, 2, 3, 4, 5, 6, 7]] if fixed_width is None else [[1, 2, 3]])
    assert warmed.generate([5, 3, 8], max_new_tokens=12, gamma=2, ignore_eos=True).token_ids == expected
    with pytest.raises(SpeculorError, match="gamma must be an integer"):
        warmed.warm_up(0)
