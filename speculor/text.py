"""Incremental detokenization with stop strings, for streaming.

Text is re-decoded from all generated ids each time (so multi-byte characters split across tokens come out whole),
and anything that could still turn into a stop string, or an unfinished UTF-8 character, is held back so no
streamed text ever has to be taken back.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextTracker:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.released = ""
        self.stopped = False

    def update(self, generated_ids: list[int]) -> str:
        """Decode the ids generated so far; return the new text safe to release. Sets `stopped` when a stop string
        appeared (the text is then cut before it)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(generated_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            safe = text[:cut]
        else:
            safe = text[: len(text) - self._hold_back(text)]
        delta = safe[len(self.released) :] if safe.startswith(self.released) else ""
        self.released += delta
        return delta

    def finish(self, generated_ids: list[int]) -> str:
        """Generation ended without a stop string: release what was held back."""
        if self.tokenizer is None or self.stopped:
            return ""
        text = self.tokenizer.decode(generated_ids, skip_special_tokens=True)
        delta = text[len(self.released) :] if text.startswith(self.released) else ""
        self.released += delta
        return delta

    def _hold_back(self, text: str) -> int:
        """Characters at the end of `text` that must wait: a partial stop string or an unfinished character."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    @property
    def text(self) -> str | None:
        return self.released if self.tokenizer is not None else None
