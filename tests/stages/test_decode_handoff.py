"""The decode worker's KV handoff bookkeeping: KV whose Generate gave up is
dropped instead of being held forever, and KV that does not match the model
is refused (the servicer runs on tiny-llava's real engine, without a server)."""

from __future__ import annotations

import grpc
import pytest
import torch

from epd.v1 import stages_pb2 as pb
from epd.workers.engine import DecodeEngine, KVCacheConfig, build_runtime
from epd.workers.messages import KVHandoff, SamplingParams
from epd.workers.models import load_adapter
from epd.workers.stages.decode import DecodeServicer
from epd.workers.wire import handoff_to_chunks


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    """The servicer only calls abort(); a real ServicerContext needs a live server."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@pytest.fixture(scope="module")
def engine() -> DecodeEngine:
    adapter = load_adapter("tiny-llava")
    runtime = build_runtime(adapter.load_language(), KVCacheConfig(capacity_bytes=1 << 20))
    return DecodeEngine(runtime.decoder, adapter, runtime.allocator)


def handoff(request_id: str, shape: tuple[int, ...] = (2, 3, 16), layers: int = 2) -> KVHandoff:
    """tiny-llava's KV: 2 layers of [2 kv heads, tokens, 16]."""
    return KVHandoff(request_id=request_id, prompt_tokens=3, first_token=5, next_position=3, rope_delta=0,
                     sampling=SamplingParams(max_tokens=4), generator_state=b"",
                     layers=[(torch.zeros(shape), torch.zeros(shape))] * layers)


def chunks(request_id: str, kv: KVHandoff | None = None):
    kv = kv or handoff(request_id)

    async def stream():
        for chunk in handoff_to_chunks(kv):
            yield chunk
    return stream()


async def test_kv_arriving_after_its_generate_gave_up_is_dropped(engine):
    now = [100.0]
    servicer = DecodeServicer(ctx=None, engine=engine, handoff_wait=0.05, clock=lambda: now[0])
    with pytest.raises(Aborted) as aborted:
        async for _ in servicer.Generate(pb.GenerateRequest(request_id="late"), FakeContext()):
            pass
    assert aborted.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "late" in str(aborted.value)
    assert servicer.arrival_events == {}

    await servicer.TransferKV(chunks("late"), FakeContext())
    assert list(servicer.arrived) == ["late"]  # kept for a while: its Generate might still come
    now[0] += 1.0
    await servicer.TransferKV(chunks("next"), FakeContext())
    assert list(servicer.arrived) == ["next"] and servicer.arrival_events == {}


async def test_a_kv_stream_without_header_is_invalid(engine):
    servicer = DecodeServicer(ctx=None, engine=engine)

    async def headless():
        for chunk in list(handoff_to_chunks(KVHandoff("x", 1, 1, 1, 0, SamplingParams(), b"",
                                                      [(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))])))[1:]:
            yield chunk
    with pytest.raises(Aborted) as aborted:
        await servicer.TransferKV(headless(), FakeContext())
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no header" in str(aborted.value)
    assert servicer.arrived == {}


@pytest.mark.parametrize("kv, message", [
    (handoff("r", layers=3), "KV of 3 layers, the model has 2"),
    (handoff("r", shape=(2, 3, 15)), "expected a floating (2, 3, 16)"),
    (handoff("r", shape=(2, 4, 16)), "expected a floating (2, 3, 16)"),
    (KVHandoff("r", 3, 10**6, 3, 0, SamplingParams(), b"", [(torch.zeros(2, 3, 16), torch.zeros(2, 3, 16))] * 2),
     "first token 1000000 is not in"),
])
async def test_kv_that_does_not_match_the_model_is_refused(engine, kv, message):
    servicer = DecodeServicer(ctx=None, engine=engine)
    with pytest.raises(Aborted) as aborted:
        await servicer.TransferKV(chunks("r", kv), FakeContext())
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT and message in str(aborted.value)
    assert servicer.arrived == {}
