"""Incremental detokenization with stop strings.

Text is emitted only once it is final: a trailing incomplete UTF-8 sequence
and any suffix that could still grow into a stop string are held back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class TokenDecoder(Protocol):
    """What detokenizing needs of a tokenizer (a Hugging Face one has it)."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class IncrementalDetokenizer:
    tokenizer: TokenDecoder
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already emitted
    stopped: bool = False

    def add(self, token_id: int) -> str:
        """Append a token; returns the newly final text (empty if held back)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.stopped = True
                return self._emit(text, at)
        return self._emit(text, len(text) - self._held_suffix(text))

    def flush(self) -> str:
        """The held-back text, at the end of the sequence."""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._emit(text, len(text))

    def _held_suffix(self, text: str) -> int:
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, text: str, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = text[self.emitted:upto]
        self.emitted = upto
        return delta
