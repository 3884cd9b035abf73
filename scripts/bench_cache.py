"""Repeated deterministic requests with the response cache off, in process (the LRU) and in Redis.

    python scripts/bench_cache.py                                   # starts redis-server and three services
    python scripts/bench_cache.py --redis-url redis://127.0.0.1:6379/0    # a Redis that is already running

The three services run side by side with the defaults (two API workers each) and a smaller KV cache
(`--kv-cache-mb`): `off` has RESPONSE_CACHE_SIZE=0, `lru` the default in-process cache, `redis` a
REDIS_URL. Every request is a greedy classification prompt through POST /generate; a set of
`--prompts` prompts is sent round robin, so each repeats. Before measuring, each service gets every
prompt `--warm` times over several connections (the LRU is per worker, so each worker has to see a
prompt once; `off` once, for the engine's prefix cache). A client's kept-alive connection stays with
one worker, so the `lru` rows' share from the cache says how well the warm-up spread. The cells
are interleaved, in a rotating order of modes, `--rounds` times, since the machine's speed drifts.
Prints one table (with the share of answers that came from the cache), then the on/off ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import redis

from serving import ROOT, percentile, short_request, start_service, stop_service

MODES = ("off", "lru", "redis")
# Several connections, so that both API workers (and so both in-process caches) see the prompts.
WARM_CONCURRENCY = 8


@dataclass
class Cell:
    mode: str
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    cached: int = 0
    wall_s: float = 0.0

    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def latency(self, q: float) -> float:
        return percentile(self.latencies_s, q)


async def run_requests(url: str, bodies: list[dict], concurrency: int, cell: Cell) -> None:
    pending = list(bodies)

    async def worker(http: httpx.AsyncClient) -> None:
        while pending:
            body = pending.pop()
            started = time.perf_counter()
            response = await http.post("/generate", json=body)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                sys.exit(f"{cell.mode}: {response.status_code} {response.text}")
            cell.latencies_s.append(elapsed)
            cell.cached += response.json()["cached"]

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        started = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        cell.wall_s += time.perf_counter() - started


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    """The given Redis, or a throw-away cache-only redis-server on port 6390 for the run."""
    if url is not None:
        yield url
        return
    binary = shutil.which("redis-server") or sys.exit("redis-server is not installed (apt-get install -y redis-server)")
    port = 6390
    with tempfile.TemporaryDirectory() as directory:
        command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", directory, "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while not _pings(client):
                if time.monotonic() > deadline:
                    sys.exit("redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.kill()
            process.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def print_tables(cells: dict[tuple[str, int], Cell], concurrencies: list[int]) -> None:
    print("| mode | conc | requests | from cache | req/s | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for concurrency in concurrencies:
        for mode in MODES:
            cell = cells[mode, concurrency]
            print(
                f"| {mode} | {concurrency} | {len(cell.latencies_s)} | {cell.cached / len(cell.latencies_s):.0%} "
                f"| {cell.requests_per_s():.1f} | {cell.latency(0.5) * 1000:.1f} | {cell.latency(0.95) * 1000:.1f} |"
            )
    print()
    print("| mode | conc | req/s on/off | p50 on/off | p95 on/off |")
    print("|---|---:|---:|---:|---:|")
    for concurrency in concurrencies:
        off = cells["off", concurrency]
        for mode in MODES[1:]:
            on = cells[mode, concurrency]
            print(
                f"| {mode} | {concurrency} | {on.requests_per_s() / off.requests_per_s():.1f}x "
                f"| {on.latency(0.5) / off.latency(0.5):.3f} | {on.latency(0.95) / off.latency(0.95):.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="a running Redis for the redis mode; default: start redis-server")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts, sent round robin")
    parser.add_argument("--requests", type=int, default=48, help="requests per cell and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=6, help="times each service gets each prompt before measuring")
    parser.add_argument("--kv-cache-mb", default="256", help="KV_CACHE_MB of the three services")
    parser.add_argument("--port", type=int, default=8021, help="the first of three ports")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    rng = random.Random(args.seed)
    prompts = [short_request(rng) for _ in range(args.prompts)]
    bodies = [prompts[number % len(prompts)] for number in range(args.requests)]
    cells = {(mode, concurrency): Cell(mode, concurrency) for mode in MODES for concurrency in args.concurrency}

    with redis_server(args.redis_url) as redis_url:
        redis.Redis.from_url(redis_url).flushdb()
        mode_env = {"off": {"RESPONSE_CACHE_SIZE": "0"}, "lru": {}, "redis": {"REDIS_URL": redis_url}}
        urls, processes = {}, []
        try:
            for offset, mode in enumerate(MODES):
                print(f"starting {mode} ...", file=sys.stderr, flush=True)
                port = args.port + offset
                env = {"KV_CACHE_MB": args.kv_cache_mb, **mode_env[mode]}
                processes.append(start_service(env, port, ROOT / f".bench-cache-{mode}.log"))
                urls[mode] = f"http://127.0.0.1:{port}"
            for mode in MODES:  # without a cache, once is enough to warm the engine's prefix cache
                warm = prompts * (1 if mode == "off" else args.warm)
                asyncio.run(run_requests(urls[mode], warm, WARM_CONCURRENCY, Cell(mode, WARM_CONCURRENCY)))
            for round_number in range(args.rounds):
                print(f"round {round_number + 1} of {args.rounds} ...", file=sys.stderr, flush=True)
                order = MODES[round_number % len(MODES) :] + MODES[: round_number % len(MODES)]
                for concurrency in args.concurrency:
                    for mode in order:
                        asyncio.run(run_requests(urls[mode], bodies, concurrency, cells[mode, concurrency]))
        finally:
            for process in processes:
                stop_service(process)

    print_tables(cells, args.concurrency)


if __name__ == "__main__":
    main()
