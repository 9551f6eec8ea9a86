"""Incremental detokenization with stop strings, for streaming.

Only a short window of recent ids is decoded each step: the text of ids[prefix:] minus the text of
ids[prefix:read] is what the newest ids add. Decoding both from the same starting token keeps tokenizers that
treat a sequence's first token specially (a SentencePiece leading space) consistent, and the window only moves on
once the new text is a whole character, so a multi-byte character split across tokens comes out whole. Text that
could still turn into a stop string is held back, so no streamed text ever has to be taken back.

Stop strings are matched incrementally: each stop string keeps a Knuth–Morris–Pratt state (how much of it the text
ends with) that only the newly decoded characters advance. A step costs time in proportion to the new text times
the number of stop strings, whatever the length of the text so far or of the stop strings, so a request with many
long stop strings cannot slow down the batch it shares a worker with as its text grows.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class StopMatcher:
    """One stop string, fed the text piece by piece. `matched` is the length of the longest prefix of the stop string
    that the text fed so far ends with: the characters that must be held back in case the stop string completes."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        # fallback[i]: the longest proper prefix of stop[: i + 1] that is also its suffix (KMP's failure function).
        self._fallback = [0] * len(stop)
        length = 0
        for index in range(1, len(stop)):
            while length and stop[index] != stop[length]:
                length = self._fallback[length - 1]
            if stop[index] == stop[length]:
                length += 1
            self._fallback[index] = length

    def feed(self, text: str, offset: int) -> int:
        """Take in `text`, which starts at index `offset` of the whole text; return the index where the first
        complete occurrence of the stop string starts, or -1 (the rest of `text` is then not taken in)."""
        stop, matched = self.stop, self.matched
        for position, char in enumerate(text):
            while matched and stop[matched] != char:
                matched = self._fallback[matched - 1]
            if stop[matched] == char:
                matched += 1
            if matched == len(stop):
                self.matched = matched
                return offset + position + 1 - len(stop)
        self.matched = matched
        return -1


class TextTracker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.matchers = [StopMatcher(s) for s in self.stop]
        self.decoded = ""
        self.released = ""
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def update(self, generated_ids: list[int]) -> str:
        """Take in the ids generated so far; return the new text safe to release. Sets `stopped` when a stop string
        appeared (the text is then cut before it; of several, at the one starting first)."""
        if self.tokenizer is None:
            return ""
        start = len(self.decoded)
        self._decode_window(generated_ids, complete=False)
        new_text = self.decoded[start:]
        hits = [matcher.feed(new_text, start) for matcher in self.matchers]
        cut = min((hit for hit in hits if hit >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            safe_length = cut
        else:
            safe_length = len(self.decoded) - max((matcher.matched for matcher in self.matchers), default=0)
        return self._release(safe_length)

    def finish(self, generated_ids: list[int]) -> str:
        """Generation ended without a stop string: release everything, an unfinished character included."""
        if self.tokenizer is None or self.stopped:
            return ""
        self._decode_window(generated_ids, complete=True)
        return self._release(len(self.decoded))

    def _decode_window(self, ids: list[int], complete: bool) -> None:
        assert self.tokenizer is not None
        settled = self.tokenizer.decode(ids[self._prefix : self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(ids[self._prefix :], skip_special_tokens=True)
        if len(window) > len(settled) and (complete or not window.endswith("\ufffd")):
            self.decoded += window[len(settled) :]
            self._prefix, self._read = self._read, len(ids)

    def _release(self, safe_length: int) -> str:
        delta = self.decoded[len(self.released) : max(safe_length, len(self.released))]
        self.released += delta
        return delta

    @property
    def text(self) -> str | None:
        return self.released if self.tokenizer is not None else None
