"""The decode worker's KV handoff bookkeeping: KV whose Generate gave up is
dropped instead of being held forever (runs the servicer without a model)."""

from __future__ import annotations

import grpc
import pytest
import torch

from epd.v1 import stages_pb2 as pb
from epd.workers.messages import KVHandoff, SamplingParams
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


def chunks(request_id: str):
    handoff = KVHandoff(request_id=request_id, prompt_tokens=3, first_token=5, next_position=3, rope_delta=0,
                        sampling=SamplingParams(max_tokens=4), generator_state=b"",
                        layers=[(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))])

    async def stream():
        for chunk in handoff_to_chunks(handoff):
            yield chunk
    return stream()


async def test_kv_arriving_after_its_generate_gave_up_is_dropped():
    now = [100.0]
    servicer = DecodeServicer(ctx=None, engine=None, handoff_wait=0.05, clock=lambda: now[0])
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


async def test_a_kv_stream_without_header_is_invalid():
    servicer = DecodeServicer(ctx=None, engine=None)

    async def headless():
        for chunk in list(handoff_to_chunks(KVHandoff("x", 1, 1, 1, 0, SamplingParams(), b"",
                                                      [(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))])))[1:]:
            yield chunk
    with pytest.raises(Aborted) as aborted:
        await servicer.TransferKV(headless(), FakeContext())
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT and "no header" in str(aborted.value)
    assert servicer.arrived == {}
