"""Route planning without servers: prefill chosen by outstanding tokens less the
prefix it probably holds, encode items spread over workers, suspects avoided."""

from __future__ import annotations

from dataclasses import replace

import pytest

from epd.workers.registry import WorkerInfo, WorkerLoad
from epd.workers.router.errors import APIError
from epd.workers.router.prefix_affinity import PrefixAffinity
from epd.workers.router.routing import RoutePlanner


def worker(stage: str, address: str, outstanding: int = 0) -> WorkerInfo:
    return WorkerInfo(stage, address, "tiny-llava", 8, load=WorkerLoad(outstanding_tokens=outstanding))


def pool(p1_load: int = 0, p2_load: int = 0) -> dict[str, list[WorkerInfo]]:
    return {"encode": [worker("encode", "e1"), worker("encode", "e2")],
            "prefill": [worker("prefill", "p1", p1_load), worker("prefill", "p2", p2_load)],
            "decode": [worker("decode", "d1")]}


def test_a_repeated_prefix_follows_its_worker_unless_it_is_much_busier():
    planner = RoutePlanner()
    chat = [f"b{i}" for i in range(10)]  # 160 tokens of blocks
    first = planner.plan(pool(), 170, [], chat, 16)
    assert first.prefill.address == "p1"  # equal load: address order
    planner.release(first, 170)
    # p1 is busier, but by less than the 160 tokens it would not recompute
    assert planner.plan(pool(p1_load=100), 180, [], chat + ["b10"], 16).prefill.address == "p1"
    planner = RoutePlanner()
    planner.release(planner.plan(pool(), 170, [], chat, 16), 170)
    assert planner.plan(pool(p1_load=400), 180, [], chat, 16).prefill.address == "p2"  # too busy: go elsewhere
    # the blocks now point at p2, so the next turn goes there
    assert planner.affinity.cached_tokens(chat, 16) == {"p2": 160}


def test_affinity_forgets_the_oldest_blocks_beyond_capacity():
    affinity = PrefixAffinity(capacity=3)
    affinity.record(["a", "b", "c"], "p1")
    affinity.record(["x"], "p2")
    assert affinity.cached_tokens(["a", "b", "c"], 4) == {"p1": 12}
    assert affinity.cached_tokens(["a"], 4) == {}  # evicted
    assert affinity.cached_tokens(["q", "x"], 4) == {"p2": 8}


def test_items_spread_over_encode_workers_and_suspects_are_avoided():
    planner = RoutePlanner()
    plan = planner.plan(pool(), 10, ["i0", "i1", "i2", "i3"])
    assert plan.encode == {"e1": ["i0", "i2"], "e2": ["i1", "i3"]}
    planner.suspect("e1")
    assert planner.plan(pool(), 10, ["j0", "j1"]).encode == {"e2": ["j0", "j1"]}
    planner.suspect("d1")
    with pytest.raises(APIError) as error:
        planner.plan(pool(), 10, [])
    assert error.value.status == 503 and "decode" in error.value.message


def test_a_restarted_worker_at_a_suspected_address_is_routed_to_again():
    """`epd serve` (and a StatefulSet pod behind a stable name) restarts a worker at its old address:
    the suspicion covers the process that failed, not whoever registers there next."""
    planner = RoutePlanner()
    failed = replace(worker("decode", "d1"), incarnation="first")
    decoders = {**pool(), "decode": [failed, worker("decode", "d2")]}
    assert planner.plan(decoders, 10, []).decode.address == "d1"
    planner.suspect("d1")
    assert planner.plan(decoders, 10, []).decode.address == "d2"
    restarted = {**pool(), "decode": [replace(failed, incarnation="second"), worker("decode", "d2")]}
    assert {planner.plan(restarted, 10, []).decode.address for _ in range(2)} == {"d1", "d2"}


def test_a_burst_spreads_over_decode_workers_whose_kv_usage_differs_by_a_stale_trifle():
    planner = RoutePlanner()
    decoders = {**pool(), "decode": [replace(worker("decode", "d1"), load=WorkerLoad(kv_usage=0.0002)),
                                     worker("decode", "d2")]}
    assert sorted(planner.plan(decoders, 10, []).decode.address for _ in range(4)) == ["d1", "d1", "d2", "d2"]
    busy = {**pool(), "decode": [replace(worker("decode", "d1"), load=WorkerLoad(kv_usage=0.5)),
                                 worker("decode", "d2")]}
    assert {RoutePlanner().plan(busy, 10, []).decode.address for _ in range(4)} == {"d2"}
