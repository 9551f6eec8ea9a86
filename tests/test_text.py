"""Incremental detokenization: streamed pieces add up to the full decode, whole characters only, stops cut."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from speculor.models import shipped
from speculor.text import TextTracker

TEXT = 'def greet(name):\n    """Say hello — naïve café, 日本語 🚀."""\n    return f"Hello, {name}!"\n'


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(shipped().target)


def stream(tokenizer, ids, stop):
    tracker = TextTracker(tokenizer, stop)
    pieces = []
    for end in range(1, len(ids) + 1):
        pieces.append(tracker.update(ids[:end]))
        if tracker.stopped:
            break
    else:
        pieces.append(tracker.finish(ids))
    return tracker, pieces


def test_pieces_add_up_to_the_full_decode_in_whole_characters(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    tracker, pieces = stream(tokenizer, ids, [])
    assert "".join(pieces) == tracker.text == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("stop", ["café", "🚀.", "return f", "\n    return"])
def test_text_stops_before_the_stop_string_and_never_streams_past_it(tokenizer, stop):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    tracker, pieces = stream(tokenizer, ids, ["never there", stop])
    assert tracker.stopped
    assert "".join(pieces) == tracker.text == TEXT[: TEXT.index(stop)]


class CharTokenizer:
    """Token id i is the character ALPHABET[i]: the tracker's decoding becomes trivial, so a test can compare its
    stop-string handling with a reference working on the whole text."""

    ALPHABET = "ab c"

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.ALPHABET[i] for i in ids)


def reference_release(text: str, released: str, stops: list[str]) -> tuple[str, bool]:
    """The new text safe to release after `text` was decoded, searching the whole text every time: cut before the
    earliest-starting stop string, else hold back the longest end of the text that begins a stop string."""
    hits = [text.find(stop) for stop in stops]
    cut = min((hit for hit in hits if hit >= 0), default=-1)
    if cut >= 0:
        return text[len(released) : max(cut, len(released))], True
    held = max((size for stop in stops for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)
    return text[len(released) : max(len(text) - held, len(released))], False


def test_incremental_stop_matching_agrees_with_whole_text_search_on_random_cases():
    rng = random.Random(0)
    stops_seen = 0
    for _ in range(400):
        ids = [rng.randrange(len(CharTokenizer.ALPHABET)) for _ in range(rng.randrange(1, 60))]
        stops = [
            "".join(rng.choice(CharTokenizer.ALPHABET) for _ in range(rng.randrange(1, 6)))
            for _ in range(rng.randrange(0, 4))
        ]
        tracker = TextTracker(CharTokenizer(), stops)
        released, end = "", 0
        while end < len(ids):
            end = min(len(ids), end + rng.randrange(1, 4))  # several tokens may come in one step
            expected, expect_stop = reference_release(CharTokenizer().decode(ids[:end]), released, stops)
            assert tracker.update(ids[:end]) == expected
            assert tracker.stopped == expect_stop
            released += expected
            if expect_stop:
                stops_seen += 1
                break
        else:
            assert tracker.finish(ids) == CharTokenizer().decode(ids)[len(released) :]
    assert stops_seen > 50, "too few cases hit a stop string to test the cut"


def test_a_stop_string_that_overlaps_itself_is_found_after_a_false_start():
    tracker = TextTracker(CharTokenizer(), ["aab"])
    assert tracker.update([0, 0]) == ""  # "aa" may begin "aab"
    assert tracker.update([0, 0, 0]) == "a"  # "aaa": only the last two may
    assert tracker.update([0, 0, 0, 1]) == ""
    assert tracker.stopped and tracker.text == "a"
