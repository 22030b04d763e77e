"""Resuming a request after a lost decode worker, without workers: the continued
request (prompt + tokens produced, tokens still allowed, the documented reseed) and
the text across the seam (a character split over tokens, a stop string spanning it)."""

from __future__ import annotations

import pytest

from epd.workers.cache import block_hashes
from epd.workers.engine.detokenizer import IncrementalDetokenizer
from epd.workers.messages import SamplingParams
from epd.workers.models import load_adapter
from epd.workers.router.prepare import PreparedRequest
from epd.workers.router.recovery import ContinuedText
from epd.workers.router.schema import parse_chat_request


@pytest.fixture(scope="module")
def adapter():
    return load_adapter("tiny-llava")


def request(sampling: SamplingParams, ids: list[int] | None = None) -> PreparedRequest:
    chat = parse_chat_request({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]})
    return PreparedRequest("chatcmpl-1", ids or list(range(40)), [], chat, sampling, [], block_size=16)


def test_the_continued_request_prefills_what_was_produced_and_asks_for_the_rest(adapter):
    original = request(SamplingParams(max_tokens=50, temperature=0))
    resumed = original.continued([7, 8, 9], attempt=1, image_token_id=adapter.image_token_id)
    assert resumed.input_ids == list(range(40)) + [7, 8, 9]
    assert (resumed.max_tokens, resumed.sampling.seed, resumed.prompt_tokens) == (47, None, 40)
    assert resumed.stage_request_id == "chatcmpl-1.1" and resumed.request_id == "chatcmpl-1"
    assert resumed.prefix_blocks == block_hashes(resumed.input_ids, adapter.image_token_id, [], [], 16)
    assert original.input_ids == list(range(40))  # the original is left as it was


@pytest.mark.parametrize("seed, produced, expected", [(5, 3, 8), (2**64 - 2, 3, 1), (None, 3, None)])
def test_a_sampled_request_resumes_with_the_seed_advanced_by_the_tokens_produced(seed, produced, expected):
    original = request(SamplingParams(max_tokens=50, temperature=0.8, seed=seed))
    resumed = original.continued(list(range(produced)), attempt=2, image_token_id=4)
    assert resumed.sampling.seed == expected and resumed.sampling.temperature == 0.8


def test_a_retry_before_any_token_keeps_the_request(adapter):
    retried = request(SamplingParams(max_tokens=5)).retried(2)
    assert (retried.stage_request_id, retried.input_ids, retried.max_tokens) == ("chatcmpl-1.2", list(range(40)), 5)


def _emitted_by_the_lost_worker(adapter, tokens: list[int], stop: tuple[str, ...]) -> str:
    detokenizer = IncrementalDetokenizer(adapter.tokenizer, stop)
    return "".join(detokenizer.add(token) for token in tokens)


@pytest.mark.parametrize("seam", range(1, 12))
def test_text_across_the_seam_is_what_an_undisturbed_run_gives(adapter, seam):
    tokens = adapter.tokenizer("héllo wörld 😀 ünïcode ok", add_special_tokens=False)["input_ids"]
    whole = adapter.tokenizer.decode(tokens)
    before = _emitted_by_the_lost_worker(adapter, tokens[:seam], ())
    continued = ContinuedText(adapter, request(SamplingParams(max_tokens=len(tokens))), tokens[:seam], len(before))
    after = ""
    for index, token in enumerate(tokens[seam:], seam):
        text, finish = continued.next([token], "length" if index == len(tokens) - 1 else "")
        after += text
    assert before + after == whole
    assert finish == "length"


def test_a_stop_string_spanning_the_seam_ends_the_answer(adapter):
    tokens = adapter.tokenizer("the cat sat on the mat and more", add_special_tokens=False)["input_ids"]
    sampling = SamplingParams(max_tokens=50, stop=("on the mat",))
    seam = next(i for i in range(1, len(tokens))
                if "on the" in adapter.tokenizer.decode(tokens[:i]) and "mat" not in adapter.tokenizer.decode(tokens[:i]))
    before = _emitted_by_the_lost_worker(adapter, tokens[:seam], sampling.stop)
    continued = ContinuedText(adapter, request(sampling), tokens[:seam], len(before))
    after, finish = "", ""
    for token in tokens[seam:]:
        text, finish = continued.next([token], "")
        after += text
        if finish:
            break
    assert (before + after, finish) == ("the cat sat ", "stop")


def test_an_end_of_sequence_token_flushes_what_was_held(adapter):
    tokens = adapter.tokenizer("hello wor", add_special_tokens=False)["input_ids"]
    sampling = SamplingParams(max_tokens=50, stop=("world!",))  # "wor" is held back: it may grow into the stop
    before = _emitted_by_the_lost_worker(adapter, tokens, sampling.stop)
    assert not before.endswith("wor")
    continued = ContinuedText(adapter, request(sampling), tokens, len(before))
    text, finish = continued.next([adapter.eos_token_ids[0]], "stop")
    assert (before + text, finish) == ("hello wor", "stop")
