"""Incremental detokenization: the streamed pieces join into exactly the whole
sequence's decode (word-boundary spaces, multi-byte characters split over
tokens, special tokens skipped), in work linear in the length, not quadratic."""

from __future__ import annotations

import random

import pytest

from epd.workers.engine.detokenizer import IncrementalDetokenizer
from epd.workers.models import load_adapter


class CountingDecoder:
    """A real tokenizer, noting how many ids each decode was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded: list[int] = []

    def decode(self, token_ids, skip_special_tokens=True):
        self.decoded.append(len(token_ids))
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl"])
def test_streamed_text_is_the_whole_decode_in_linear_work(model):
    tokenizer = load_adapter(model).tokenizer
    rng = random.Random(7)
    for length in (1, 5, 60, 600):
        ids = [rng.randrange(len(tokenizer)) for _ in range(length)]  # byte tokens, words, special tokens
        counting = CountingDecoder(tokenizer)
        detokenizer = IncrementalDetokenizer(counting)
        streamed = "".join(detokenizer.add(token) for token in ids) + detokenizer.flush()
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)
        assert sum(counting.decoded) <= 8 * length + 8  # a window per token, never the whole sequence


def test_a_resumed_stream_continues_the_text_it_had_sent():
    tokenizer = load_adapter("tiny-llava").tokenizer
    rng = random.Random(3)
    ids = [rng.randrange(len(tokenizer)) for _ in range(80)]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    first = IncrementalDetokenizer(tokenizer)
    sent = "".join(first.add(token) for token in ids[:50])
    resumed = IncrementalDetokenizer(tokenizer, (), list(ids[:50]), len(sent))
    assert sent + "".join(resumed.add(token) for token in ids[50:]) + resumed.flush() == whole
