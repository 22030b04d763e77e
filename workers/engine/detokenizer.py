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
    """`token_ids` and `emitted` resume a stream (the router's recovery): the text of those tokens counts as
    decoded, `emitted` characters of it as sent.

    Each token decodes a window of the last few tokens, not the whole sequence: decoding every token's
    full sequence cost a 1,000-token answer 94 ms here (quadratic), a big decode batch of long answers
    milliseconds per step. The window starts at the tokens of the previous step, so word-boundary spaces
    come out as they would in the whole decode."""

    tokenizer: TokenDecoder
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of `text` already emitted
    stopped: bool = False
    text: str = field(default="", init=False)  # the decoded text of token_ids[:read_offset]
    prefix_offset: int = field(default=0, init=False)  # the window's first token
    read_offset: int = field(default=0, init=False)  # the first token not in `text`

    def __post_init__(self) -> None:
        self._read()

    def add(self, token_id: int) -> str:
        """Append a token; returns the newly final text (empty if held back)."""
        self.token_ids.append(token_id)
        if not self._read():
            return ""  # an incomplete multi-byte character: wait for the next token
        text = self.text
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.stopped = True
                return self._emit(text, at)
        return self._emit(text, len(text) - self._held_suffix(text))

    def flush(self) -> str:
        """The held-back text, at the end of the sequence."""
        self._read(final=True)
        return self._emit(self.text, len(self.text))

    def _read(self, final: bool = False) -> bool:
        """Decode the tokens after `read_offset` into `text`; False (nothing read) while they end inside a
        character, unless `final`."""
        if self.read_offset == len(self.token_ids):
            return True
        decode = self.tokenizer.decode
        prefix = decode(self.token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        window = decode(self.token_ids[self.prefix_offset:], skip_special_tokens=True)
        if window.endswith("\ufffd") and not final:
            return False
        self.text += window[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return True

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
