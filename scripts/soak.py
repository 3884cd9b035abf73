"""Soak: thousands of mixed requests against one service, watching for errors and leaks.

    python scripts/soak.py                         # starts the service, 2,000 requests, 8 at a time
    python scripts/soak.py --requests 500 --quick-report
    python scripts/soak.py --url http://127.0.0.1:8003   # a running service on this machine

The mix: plain and streamed generations, streams the client leaves after the first token,
generations the client abandons mid-way, invalid bodies of many kinds (each must get its 4xx),
and GET probes. Every `--flip-every` requests the traffic pauses, the default model is unloaded
and loaded again, and the traffic goes on. Samples the service's processes every `--sample-every`
requests: RSS, RssAnon+VmSwap (memory a leak would hold), threads and open files. Prints the
samples, the statuses by kind, and the verdict: no 5xx, and RSS growth between request 200 and
the end under 5%. Exits 1 when the verdict fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import time
from dataclasses import dataclass

import httpx
import psutil

from serving import served, short_request

BASELINE_AT = 200
MAX_RSS_GROWTH = 0.05

INVALID_BODIES: list[tuple[str, bytes]] = [
    ("temperature out of range", b'{"query": "hi", "temperature": 3}'),
    ("max_length out of range", b'{"query": "hi", "max_length": 100000}'),
    ("unknown field", b'{"query": "hi", "top_k": 5}'),
    ("wrong type", b'{"query": ["hi"]}'),
    ("missing query", b'{"context": ["a"]}'),
    ("NUL byte", b'{"query": "hi\\u0000there"}'),
    ("invalid UTF-8", b'{"query": "\xff\xfe"}'),
    ("invalid JSON", b'{"query": "hi"'),
    ("unknown model", b'{"query": "hi", "model_id": "no-such-model"}'),
    ("context list too long", b'{"query": "hi", "context": [' + b",".join([b'"x"'] * 1000) + b"]}"),
]
KINDS = ("generate", "stream", "stream_left", "generate_abandoned", "invalid", "probe")
WEIGHTS = (40, 20, 10, 10, 15, 5)


@dataclass
class Sample:
    requests: int
    rss_mb: float
    anon_swap_mb: float
    engine_rss_mb: float
    threads: int
    open_files: int


def proc_status(pid: int) -> collections.defaultdict[str, float]:
    """The numbers of /proc/PID/status (memory in kB); absent keys read 0 (VmSwap without swap)."""
    status: collections.defaultdict[str, float] = collections.defaultdict(float)
    for line in open(f"/proc/{pid}/status").read().splitlines():
        key, _, value = line.partition(":")
        number = value.split()[0] if value.split() else ""
        if number.isdigit():
            status[key] = float(number)
    return status


class ServiceProcesses:
    """The service's processes on this machine: the `bentoml serve` tree, or the engine of a given URL."""

    def __init__(self, root_pid: int | None, url: str) -> None:
        self.root_pid = root_pid
        self.engine_pid = httpx.get(f"{url}/system-info", timeout=30).json()["engine_pid"]

    def processes(self) -> list[psutil.Process]:
        if self.root_pid is None:
            return [psutil.Process(self.engine_pid)]
        root = psutil.Process(self.root_pid)
        return [root, *root.children(recursive=True)]

    def sample(self, requests: int) -> Sample:
        rss = anon_swap = engine_rss = 0.0
        threads = open_files = 0
        for process in self.processes():
            try:
                status = proc_status(process.pid)
                rss += status["VmRSS"] / 1024
                anon_swap += (status["RssAnon"] + status["VmSwap"]) / 1024
                threads += int(status["Threads"])
                open_files += len(os.listdir(f"/proc/{process.pid}/fd"))
                if process.pid == self.engine_pid:
                    engine_rss = status["VmRSS"] / 1024
            except (FileNotFoundError, ProcessLookupError):  # a worker restarting between listing and reading
                continue
        return Sample(requests, rss, anon_swap, engine_rss, threads, open_files)


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random) -> tuple[str, int | str]:
    """Sends one request of the kind; returns the kind (or the invalid case) and the status seen."""
    body = short_request(rng)
    try:
        if kind == "generate":
            return kind, (await client.post("/generate", json=body)).status_code
        if kind in ("stream", "stream_left"):
            async with client.stream("POST", "/generate/stream", json=body) as response:
                async for line in response.aiter_lines():
                    if '"error_type"' in line:
                        return kind, "stream error event"
                    if kind == "stream_left" and line.startswith("data:"):
                        break  # leaving closes the connection: the engine must drop the sequence
                return kind, response.status_code
        if kind == "generate_abandoned":
            story = {"query": "Tell a long story about a lighthouse keeper.", "max_length": 60, "temperature": 0.7}
            try:
                return kind, (await client.post("/generate", json=story, timeout=rng.uniform(0.05, 0.5))).status_code
            except httpx.TimeoutException:
                return kind, "abandoned"
        if kind == "invalid":
            case, raw = rng.choice(INVALID_BODIES)
            response = await client.post("/generate", content=raw, headers={"content-type": "application/json"})
            return f"invalid: {case}", response.status_code
        route = rng.choice(["/health", "/memory-usage", "/models", "/livez", "/readyz"])
        return f"probe {route}", (await client.get(route)).status_code
    except httpx.TransportError as error:
        return kind, type(error).__name__


async def flip_default_model(client: httpx.AsyncClient) -> list[int]:
    return [(await client.post(route, json={})).status_code for route in ("/unload-model", "/load-model")]


async def soak(url: str, args: argparse.Namespace, processes: ServiceProcesses) -> tuple[collections.Counter, list[Sample]]:
    rng = random.Random(args.seed)
    statuses: collections.Counter = collections.Counter()
    samples = [processes.sample(0)]
    sent = 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while sent < args.requests:
            batch = min(args.sample_every, args.requests - sent)
            queue = asyncio.Queue()
            for _ in range(batch):
                queue.put_nowait(rng.choices(KINDS, WEIGHTS)[0])

            async def worker() -> None:
                while not queue.empty():
                    statuses[await one(client, queue.get_nowait(), rng)] += 1

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            sent += batch
            if args.flip_every and sent % args.flip_every == 0 and sent < args.requests:
                for status in await flip_default_model(client):
                    statuses[("load/unload", status)] += 1
            samples.append(processes.sample(sent))
            print(f"  {sent} requests", file=sys.stderr, flush=True)
    return statuses, samples


def report(statuses: collections.Counter, samples: list[Sample], elapsed_s: float) -> bool:
    print("| requests | RSS MB (all processes) | RssAnon+VmSwap MB | engine RSS MB | threads | open files |")
    print("|---:|---:|---:|---:|---:|---:|")
    for sample in samples:
        print(
            f"| {sample.requests} | {sample.rss_mb:.0f} | {sample.anon_swap_mb:.0f} | {sample.engine_rss_mb:.0f} "
            f"| {sample.threads} | {sample.open_files} |"
        )
    print("\n| kind | status | count |\n|---|---|---:|")
    for (kind, status), count in sorted(statuses.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        print(f"| {kind} | {status} | {count} |")
    server_errors = sum(count for (_, status), count in statuses.items() if isinstance(status, int) and status >= 500)
    transport_errors = sum(count for (_, status), count in statuses.items() if isinstance(status, str) and status != "abandoned")
    invalid_not_4xx = sum(
        count for (kind, status), count in statuses.items()
        if kind.startswith("invalid") and not (isinstance(status, int) and 400 <= status < 500)
    )
    baseline = next(sample for sample in samples if sample.requests >= min(BASELINE_AT, samples[-1].requests))
    growth = (samples[-1].rss_mb - baseline.rss_mb) / baseline.rss_mb
    anon_growth = (samples[-1].anon_swap_mb - baseline.anon_swap_mb) / baseline.anon_swap_mb
    total = sum(count for (kind, _), count in statuses.items() if kind != "load/unload")
    print(f"\n{total} requests in {elapsed_s:.0f} s ({total / elapsed_s:.1f} req/s)")
    print(f"5xx: {server_errors}; transport errors: {transport_errors}; invalid bodies without a 4xx: {invalid_not_4xx}")
    print(
        f"RSS from request {baseline.requests} to {samples[-1].requests}: {baseline.rss_mb:.0f} -> {samples[-1].rss_mb:.0f} MB "
        f"({growth:+.1%}); RssAnon+VmSwap {baseline.anon_swap_mb:.0f} -> {samples[-1].anon_swap_mb:.0f} MB ({anon_growth:+.1%}); "
        f"threads {baseline.threads} -> {samples[-1].threads}; open files {baseline.open_files} -> {samples[-1].open_files}"
    )
    passed = server_errors == 0 and transport_errors == 0 and invalid_not_4xx == 0 and growth < MAX_RSS_GROWTH
    print("verdict:", "PASS" if passed else "FAIL", f"(no 5xx, RSS growth under {MAX_RSS_GROWTH:.0%})")
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="soak a running service on this machine instead of starting one")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--flip-every", type=int, default=500, help="unload and reload the default model; 0: never")
    parser.add_argument("--port", type=int, default=8013)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.flip_every % args.sample_every:
        parser.error("--flip-every must be a multiple of --sample-every")
    # No response cache: the prompts repeat, and every request should reach the engine.
    with served(args.url, args.port, {"RESPONSE_CACHE_SIZE": "0"}, ".soak.log") as (url, process):
        processes = ServiceProcesses(process.pid if process else None, url)
        started = time.perf_counter()
        statuses, samples = asyncio.run(soak(url, args, processes))
        passed = report(statuses, samples, time.perf_counter() - started)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
