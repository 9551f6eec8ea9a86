"""Incremental detokenization with stop strings, for streaming.

Only a short window of recent ids is decoded each step: the text of ids[prefix:] minus the text of
ids[prefix:read] is what the newest ids add. Decoding both from the same starting token keeps tokenizers that
treat a sequence's first token specially (a SentencePiece leading space) consistent, and the window only moves on
once the new text is a whole character, so a multi-byte character split across tokens comes out whole. Text that
could still turn into a stop string is held back, so no streamed text ever has to be taken back.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextTracker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.decoded = ""
        self.released = ""
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def update(self, generated_ids: list[int]) -> str:
        """Take in the ids generated so far; return the new text safe to release. Sets `stopped` when a stop string
        appeared (the text is then cut before it)."""
        if self.tokenizer is None:
            return ""
        self._decode_window(generated_ids, complete=False)
        cut = self._find_stop()
        if cut >= 0:
            self.stopped = True
            safe_length = cut
        else:
            safe_length = len(self.decoded) - self._partial_stop_length()
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

    def _find_stop(self) -> int:
        """Where the first stop string starts, or -1. Released text holds none, so only its tail is searched."""
        hits = [self.decoded.find(stop, max(0, len(self.released) - len(stop) + 1)) for stop in self.stop]
        return min((hit for hit in hits if hit >= 0), default=-1)

    def _partial_stop_length(self) -> int:
        """Characters at the end of the decoded text that may be the start of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.decoded)), longest, -1):
                if self.decoded.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, safe_length: int) -> str:
        delta = self.decoded[len(self.released) : max(safe_length, len(self.released))]
        self.released += delta
        return delta

    @property
    def text(self) -> str | None:
        return self.released if self.tokenizer is not None else None
