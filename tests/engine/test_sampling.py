"""Sampling, seeds across the prefill -> decode handoff, stop strings and finish reasons."""

from __future__ import annotations

import pytest
import torch

from epd.workers.engine import DecodeEngine, KVCacheConfig, PrefillEngine, build_runtime
from epd.workers.engine.detokenizer import IncrementalDetokenizer
from epd.workers.engine.sampling import generator_state, new_generator, restore_generator, sample
from epd.workers.messages import ChatMessage, PrefillJob, SamplingParams, TextPart
from epd.workers.models import load_adapter


@pytest.fixture(scope="module")
def llava():
    adapter = load_adapter("tiny-llava")
    return adapter, adapter.load_language()


def generate(adapter, language, sampling: SamplingParams, text: str = "Tell me a story.") -> list:
    ids = adapter.build_prompt([ChatMessage("user", (TextPart(text),))], [])
    runtime = build_runtime(language, KVCacheConfig(capacity_bytes=1 << 22))
    prefill = PrefillEngine(runtime.decoder, adapter, runtime.allocator)
    decode = DecodeEngine(runtime.decoder, adapter, runtime.allocator)
    decode.reserve("r", len(ids), sampling.max_tokens, adopt=True)
    handoff = prefill.run([PrefillJob("r", ids, [], [], sampling)])[0]
    prefill.release("r", adopted=True)
    events = [decode.commit(handoff, handoff.block_table)]
    while decode.active:
        events.extend(decode.step())
    return events


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    generator = new_generator(SamplingParams(temperature=1.0, seed=0))
    assert {sample(logits, SamplingParams(temperature=1.0, top_k=1), generator) for _ in range(20)} == {1}
    assert {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), generator) for _ in range(50)} <= {1, 2}
    assert sample(logits, SamplingParams(), generator) == 1


def test_generator_state_round_trips():
    params = SamplingParams(temperature=0.7, seed=1234)
    generator = new_generator(params)
    torch.rand(3, generator=generator)
    copy = restore_generator(generator_state(generator), params)
    assert torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=copy))


def test_greedy_requests_carry_no_generator_and_sampling_never_falls_back_to_the_global_one():
    greedy = SamplingParams(temperature=0.0, seed=3)
    assert new_generator(greedy) is None and generator_state(None) == b""
    assert restore_generator(b"", greedy) is None
    assert sample(torch.tensor([0.0, 2.0, 1.0]), greedy, None) == 1
    with pytest.raises(ValueError, match="needs the request's generator"):
        sample(torch.tensor([0.0, 2.0, 1.0]), SamplingParams(temperature=1.0), None)


def test_seeded_sampling_is_reproducible_across_the_handoff(llava):
    adapter, language = llava
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    first = [e.token_id for e in generate(adapter, language, params)]
    again = [e.token_id for e in generate(adapter, language, params)]
    other = [e.token_id for e in generate(adapter, language, SamplingParams(**{**params.__dict__, "seed": 8}))]
    assert first == again and len(first) == 12
    assert first != other


def test_max_tokens_gives_length_and_text_is_complete(llava):
    adapter, language = llava
    events = generate(adapter, language, SamplingParams(max_tokens=9, ignore_eos=True))
    assert [e.finish_reason for e in events] == [None] * 8 + ["length"]
    text = "".join(e.text for e in events)
    assert text == adapter.tokenizer.decode([e.token_id for e in events], skip_special_tokens=True)


def test_stop_string_ends_with_stop_and_is_not_emitted(llava):
    adapter, language = llava
    full = "".join(e.text for e in generate(adapter, language, SamplingParams(max_tokens=20, ignore_eos=True)))
    stop = full[5:8]
    events = generate(adapter, language, SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == full[:full.index(stop)]


def test_eos_finishes_with_stop_and_no_text(llava, monkeypatch):
    adapter, language = llava
    greedy = generate(adapter, language, SamplingParams(max_tokens=6, ignore_eos=True))
    eos = greedy[3].token_id  # pretend the 4th greedy token is the model's EOS
    first = next(i for i, e in enumerate(greedy) if e.token_id == eos)
    monkeypatch.setattr(type(adapter), "eos_token_ids", property(lambda self: (eos,)))
    events = generate(adapter, language, SamplingParams(max_tokens=6))
    assert [e.finish_reason for e in events] == [None] * first + ["stop"]
    assert events[-1].text == ""


def test_detokenizer_holds_back_a_possible_stop_prefix():
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    detok = IncrementalDetokenizer(Chars(), stop=("END",))
    out = [detok.add(ord(c)) for c in "abEN"]
    assert out == ["a", "b", "", ""]
    assert detok.add(ord("x")) == "ENx"
    assert detok.add(ord("E")) == "" and detok.add(ord("N")) == "" and detok.add(ord("D")) == ""
    assert detok.stopped


def test_invalid_sampling_is_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
