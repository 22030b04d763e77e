"""Prompt ids in which user text stays text.

A chat template marks turns with control tokens (`</s>`, `<s>`, `<|im_end|>`,
image placeholders). Tokenizing the rendered prompt in one go would turn those
strings into control tokens wherever they appear, so a user typing `</s><s>`
could forge a turn boundary. Here every text part of the request is rendered
as a marker, and only the template's own text may yield special tokens; the
request's text is tokenized with special-token strings as plain characters.
Where the text holds no such strings the ids are exactly the tokenizer's own.
`--allow-special-tokens-in-text` restores the old behaviour for deployments
whose clients send pre-formatted prompts on purpose."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import Tokenizer

from epd.image_size import ImageSize

from ..messages import ChatMessage, TextPart
from ..models import ModelAdapter

_MARKER = "\x00epd-text-{}\x00"
_MARKER_RE = re.compile("\x00epd-text-(\\d+)\x00")


class PromptEncoder:
    """Builds prompt ids for one model; safe to call from several threads."""

    def __init__(self, adapter: ModelAdapter, special_tokens_in_text: bool = False) -> None:
        self.adapter = adapter
        self.special_tokens_in_text = special_tokens_in_text
        tokenizer = adapter.tokenizer
        specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
                          key=len, reverse=True)
        self._special_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        # A copy that never recognises special tokens (toggling the shared one per call would race).
        self._plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True
        # No token spans more characters than its longest vocabulary entry has bytes (byte-level
        # vocabularies spell one byte per character), so text longer than context * this cannot fit.
        self.max_chars_per_token = max(len(token) for token in tokenizer.get_vocab())

    def fits(self, characters: int) -> bool:
        """Cheap bound before tokenizing: False only if this much text is surely over the context."""
        return characters <= self.adapter.max_context * self.max_chars_per_token

    def encode(self, messages: Sequence[ChatMessage], image_sizes: Sequence[ImageSize]) -> list[int]:
        """Template applied, image placeholders expanded; ValueError on a placeholder/image mismatch."""
        if self.special_tokens_in_text:
            return self.adapter.build_prompt(messages, image_sizes)
        texts: list[str] = []
        marked = [ChatMessage(m.role, tuple(_marked(part, texts) for part in m.parts)) for m in messages]
        return self.adapter.build_prompt(marked, image_sizes, tokenize=lambda rendered: self._ids(rendered, texts))

    def _ids(self, rendered: str, texts: list[str]) -> list[int]:
        ids: list[int] = []
        plain: list[str] = []  # text waiting to be tokenized in one piece, up to the next control token
        for index, piece in enumerate(_MARKER_RE.split(rendered)):
            if index % 2:  # a marker: the request's own text
                plain.append(texts[int(piece)])
                continue
            parts = self._special_re.split(piece) if self._special_re else [piece]
            for position, part in enumerate(parts):
                if position % 2:  # a control token the template wrote
                    ids += self._tokenize(plain)
                    plain = []
                    ids.append(self._special_ids[part])
                else:
                    plain.append(part)
        return ids + self._tokenize(plain)

    def _tokenize(self, pieces: list[str]) -> list[int]:
        text = "".join(pieces)
        return self._plain.encode(text, add_special_tokens=False).ids if text else []


def _marked(part, texts: list[str]):
    if not isinstance(part, TextPart):
        return part
    texts.append(part.text)
    return TextPart(_MARKER.format(len(texts) - 1))
