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


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl"])
def test_the_token_decoder_decodes_exactly_as_the_tokenizer(model):
    adapter = load_adapter(model)
    tokenizer, decoder = adapter.tokenizer, adapter.token_decoder
    assert decoder is tokenizer.backend_tokenizer  # these tokenizers take the fast path
    rng = random.Random(11)
    for length in (1, 2, 3, 8, 40):
        for _ in range(40):
            ids = [rng.randrange(len(tokenizer)) for _ in range(length)]
            for skip in (True, False):
                assert decoder.decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_that_cleans_up_spaces_decodes_for_itself():
    adapter = load_adapter("tiny-llava")
    adapter.tokenizer.clean_up_tokenization_spaces = True  # its cleanup is not in the Rust decoder
    assert adapter.token_decoder is adapter.tokenizer
