"""Drives a workload against an OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from tqdm import tqdm

from epd.slo import SLO

from .client import RequestResult, stream_chat
from .report import summarize
from .workload import RequestFactory, WorkloadSpec, arrival_times


async def run_workload(base_url: str, spec: WorkloadSpec, slo: SLO, concurrency: int = 64,
                       request_timeout: float = 600.0, progress: bool = True, api_key: str = "") -> dict:
    """Send the workload (arrivals on schedule, at most `concurrency` in flight); returns the summary."""
    count = spec.requests if spec.duration <= 0 else max(1, int(spec.rate * spec.duration) if spec.rate else spec.requests)
    factory = RequestFactory(spec)
    bodies = [factory.body(i) for i in range(count)]
    schedule = arrival_times(spec, count)
    limit = asyncio.Semaphore(concurrency)
    results: list[RequestResult] = []
    bar = tqdm(total=count, desc="requests", unit="req", disable=not progress)
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        start = time.perf_counter()

        async def one(offset: float, body: dict) -> None:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule, not synchronisation
            async with limit:
                result = await stream_chat(session, base_url, body, request_timeout)
            results.append(result)
            bar.update(1)

        await asyncio.gather(*(one(offset, body) for offset, body in zip(schedule, bodies, strict=True)))
        wall = time.perf_counter() - start
    bar.close()
    summary = summarize(results, wall, slo)
    summary["workload"] = {**spec.__dict__, "image_size": [spec.image_size.width, spec.image_size.height], "concurrency": concurrency}
    return summary
