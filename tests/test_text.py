"""Incremental detokenization: streamed pieces add up to the full decode, whole characters only, stops cut."""

from __future__ import annotations

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
