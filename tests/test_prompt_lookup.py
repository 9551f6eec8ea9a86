"""Prompt lookup's matching against a brute-force reading of its definition."""

from __future__ import annotations

import random

import numpy as np

from speculor.proposers import find_continuation


def brute_force(context: list[int], max_ngram: int, gamma: int) -> list[int]:
    for size in range(min(max_ngram, len(context) - 1), 0, -1):
        pattern = context[-size:]
        for start in range(len(context) - size - 1, -1, -1):
            if context[start : start + size] == pattern:
                return context[start + size : start + size + gamma]
    return []


def test_matches_brute_force_on_random_contexts():
    rng = random.Random(0)
    found = 0
    for _ in range(500):
        context = [rng.randrange(rng.choice([3, 6, 40])) for _ in range(rng.randint(1, 60))]
        for max_ngram in (1, 2, 3, 5):
            expected = brute_force(context, max_ngram, 4)
            assert find_continuation(np.asarray(context, dtype=np.int64), max_ngram, 4) == expected
            found += bool(expected)
    assert found > 100


def test_prefers_the_longest_then_the_latest_match():
    context = np.asarray([1, 2, 9, 5, 2, 7, 1, 2], dtype=np.int64)
    assert find_continuation(context, 2, 3) == [9, 5, 2]
    assert find_continuation(context, 1, 3) == [7, 1, 2]
    assert find_continuation(np.asarray([4], dtype=np.int64), 3, 3) == []
