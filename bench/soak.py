"""Soak run: N minutes of mixed load on `epd serve --encode 2 --prefill 2 --decode 2`
while a random worker is killed (SIGKILL or SIGTERM) every M seconds and Redis is
stopped once (hung for a while, then killed; `epd serve` restarts what dies).
Prints requests sent / completed / failed, the recoveries the router made, and the
RSS of every process at the start and the end; writes the same as JSON.

    python -m epd.bench.soak --minutes 30 --kill-every 20 --out bench/results/soak.json

Not a test: it takes as long as you ask, on a quiet machine. Linux only (/proc)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import redis

from epd.stages import STAGES
from epd.synthetic_images import noise_png_data_url

from ..workers.launcher.processes import ProcessGroup, free_port, start_serve
from ..workers.registry import KEY_PREFIX, WorkerInfo
from .report import write_json


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # the first few reasons

    def fail(self, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(reason)


class Serve:
    """`epd serve` with its own Redis, and a view of the processes under it."""

    def __init__(self, model: str, replicas: int) -> None:
        port = free_port()
        self.group = ProcessGroup(quiet=True)
        self.child = start_serve(self.group, model, port, "--quiet",
                                 *(f"--{stage}={replicas}" for stage in STAGES))
        self.fields = self.child.ready_fields
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.redis = redis.Redis.from_url(self.fields["redis"], socket_timeout=2, socket_connect_timeout=2)

    def workers(self) -> list[WorkerInfo]:
        try:
            keys = self.redis.keys(KEY_PREFIX + "*")
            return [WorkerInfo.from_json(raw) for raw in self.redis.mget(keys) if raw] if keys else []
        except redis.RedisError:
            return []

    def redis_pid(self) -> int | None:
        try:
            return int(self.redis.info("server")["process_id"])
        except redis.RedisError:
            return None

    def processes(self) -> dict[str, int]:
        """label -> pid of every process under `epd serve`."""
        found = {}
        for pid in _children(self.child.process.pid):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "redis-server" in command:
                label = "redis"
            elif " router " in command:
                label = "router"
            else:
                label = "worker " + command.split("--role ", 1)[-1].split()[0]
            found[f"{label} (pid {pid})"] = pid
        return found

    def stop(self) -> None:
        self.group.stop(grace=60)


def _children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(found)


def rss_mib(pids: dict[str, int]) -> dict[str, float]:
    sizes = {}
    for label, pid in pids.items():
        try:
            line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
            sizes[label] = round(int(line.split()[1]) / 1024, 1)
        except (OSError, StopIteration):
            continue
    return sizes


async def one_request(session: aiohttp.ClientSession, base_url: str, model: str, rng: random.Random,
                      images: list[str]) -> str:
    """Send one mixed request; "" if it completed as asked, else why not."""
    max_tokens = rng.randint(4, 48)
    content: list[dict] = [{"type": "image_url", "image_url": {"url": rng.choice(images)}}
                           for _ in range(rng.choice((0, 0, 1, 2)))]
    content.append({"type": "text", "text": f"Request {rng.random():.6f}: describe it."})
    stream = rng.random() < 0.5
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": rng.choice((0, 0.8)), "stream": stream}
    async with session.post(base_url + "/chat/completions", json=body) as response:
        if response.status != 200:
            return f"HTTP {response.status}: {(await response.text())[:160]}"
        if not stream:
            got = (await response.json())["usage"]["completion_tokens"]
            return "" if got == max_tokens else f"{got} of {max_tokens} tokens"
        tokens, last = 0, ""
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            last = line[6:]
            if last != "[DONE]":
                chunk = json.loads(last)
                if "error" in chunk:
                    return f"stream error: {chunk['error']['message'][:160]}"
                tokens += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("role") is None)
        if last != "[DONE]":
            return "stream ended without [DONE]"
        return "" if tokens == max_tokens else f"{tokens} of {max_tokens} streamed tokens"


async def load(base_url: str, model: str, deadline: float, concurrency: int, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    images = [noise_png_data_url(rng.randint(32, 96), rng.randint(32, 96), i) for i in range(12)]  # repeats hit the cache

    async def client(index: int) -> None:
        local = random.Random(seed * 1000 + index)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            while time.monotonic() < deadline:
                tally.sent += 1
                try:
                    reason = await one_request(session, base_url, model, local, images)
                except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if reason:
                    tally.fail(reason)
                else:
                    tally.completed += 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))


def chaos(serve: Serve, start: float, deadline: float, kill_every: float, redis_at: float, redis_pause: float,
          seed: int, events: list[str], stop: threading.Event) -> None:
    """Kill a random worker every `kill_every` seconds (only where a sibling is live), and stop
    Redis once at `redis_at` seconds: hung for `redis_pause` seconds, then killed."""
    rng = random.Random(seed)
    next_kill, redis_done = start + kill_every, False
    while not stop.wait(0.5) and time.monotonic() < deadline:
        now = time.monotonic()
        if not redis_done and now - start >= redis_at:
            redis_done = True
            pid = serve.redis_pid()
            if pid:
                os.kill(pid, signal.SIGSTOP)
                events.append(f"{now - start:7.1f}s redis (pid {pid}) SIGSTOP for {redis_pause:g}s, then SIGKILL")
                stop.wait(redis_pause)
                os.kill(pid, signal.SIGKILL)
                continue
        if now >= next_kill:
            next_kill = now + kill_every
            workers = serve.workers()
            by_stage: dict[str, list[WorkerInfo]] = {stage: [w for w in workers if w.stage == stage]
                                                     for stage in STAGES}
            candidates = [w for w in workers if len(by_stage[w.stage]) >= 2]
            if not candidates:
                events.append(f"{now - start:7.1f}s no worker with a live sibling in discovery: nothing killed")
                continue
            victim = rng.choice(candidates)
            sig = rng.choice((signal.SIGKILL, signal.SIGTERM))
            try:
                os.kill(victim.pid, sig)
            except ProcessLookupError:
                continue
            events.append(f"{now - start:7.1f}s {victim.stage} {victim.address} (pid {victim.pid}) {sig.name}")


def router_recoveries(metrics_url: str) -> dict[str, float]:
    found = {"retry": 0.0, "resume": 0.0}
    try:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return found
    for line in text.splitlines():
        if line.startswith("epd_router_recoveries_total{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            found[kind] = float(line.rsplit(" ", 1)[1])
    return found


def run(args: argparse.Namespace) -> int:
    serve = Serve(args.model, args.replicas)
    tally, stop = Tally(), threading.Event()
    events: list[str] = []
    try:
        rss_start = rss_mib(serve.processes())
        start = time.monotonic()
        deadline = start + args.minutes * 60
        killer = threading.Thread(target=chaos, args=(serve, start, deadline, args.kill_every,
                                                      args.redis_stop_at * args.minutes * 60, args.redis_pause,
                                                      args.seed, events, stop), daemon=True)
        killer.start()
        asyncio.run(load(serve.base_url, args.model, deadline, args.concurrency, args.seed, tally))
        stop.set()
        killer.join(30)
        rss_end = rss_mib(serve.processes())
        recoveries = router_recoveries(serve.fields["router-metrics"])
    finally:
        stop.set()
        serve.stop()
    report = {"minutes": args.minutes, "kill_every_s": args.kill_every, **asdict(tally), "recoveries": recoveries,
              "events": events, "rss_mib_start": rss_start, "rss_mib_end": rss_end}
    print(f"requests sent {tally.sent}, completed {tally.completed}, failed {tally.failed}")
    print(f"router recoveries: retry {recoveries['retry']:.0f}, resume {recoveries['resume']:.0f}")
    print(f"{len(events)} disruptions:\n" + "\n".join(events))
    for reason in tally.failures:
        print(f"  failed: {reason}")
    print("RSS MiB at start:\n" + "\n".join(f"  {k:32s} {v:8.1f}" for k, v in rss_start.items()))
    print("RSS MiB at end:\n" + "\n".join(f"  {k:32s} {v:8.1f}" for k, v in rss_end.items()))
    if args.out:
        write_json(args.out, report)
    return 0 if tally.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epd.bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between worker kills")
    parser.add_argument("--redis-stop-at", type=float, default=0.5, help="when Redis is stopped, as a fraction of the run")
    parser.add_argument("--redis-pause", type=float, default=10.0, help="seconds Redis stays hung before it is killed")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending requests back to back")
    parser.add_argument("--replicas", type=int, default=2, help="workers per stage")
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the report as JSON here")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
