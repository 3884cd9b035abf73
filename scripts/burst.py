"""Overload: a burst of concurrent generation requests against a concurrency cap.

    python scripts/burst.py                       # starts the service with MAX_CONCURRENT_REQUESTS=32
    python scripts/burst.py --url http://127.0.0.1:8003 --requests 200
    python scripts/burst.py --cap 512 --hog 2     # at defaults, on a machine a CPU hog keeps busy (issue 15)

Opens every connection first, then sends all the requests at once, so the figures are the
service's: the client is raw asyncio sockets with prebuilt requests (an HTTP client library on
the same two cores would add its own queueing to every latency). Prints the statuses, the
latency of the refusals (429) and of the answers, and its verdict: only 200 and 429, every 429
within --refusal-ms, every answer within --deadline-s, and a normal answer right after. `--hog N` runs N processes that spin at normal priority (another job on the cores)
from a few seconds before the first burst to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from urllib.parse import urlparse

import httpx

from serving import served

BODY = json.dumps({"query": "Is this post spam? Answer yes or no.", "context": ["Post: buy cheap watches now"], "max_length": 10})


def raw_request(host: str) -> bytes:
    return (
        f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n{BODY}"
    ).encode()


async def burst(url: str, count: int) -> list[tuple[int, float]]:
    address = urlparse(url)
    request = raw_request(address.netloc)
    connections = [await asyncio.open_connection(address.hostname, address.port) for _ in range(count)]
    go = asyncio.Event()

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, float]:
        await go.wait()
        started = time.perf_counter()
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        elapsed = time.perf_counter() - started
        await reader.read()  # the rest, until the server closes
        writer.close()
        return int(status_line.split()[1]), elapsed

    tasks = [asyncio.create_task(send(reader, writer)) for reader, writer in connections]
    await asyncio.sleep(0.1)
    go.set()
    return await asyncio.gather(*tasks)


def spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def cpu_hog(processes: int):
    hogs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(processes)]
    for hog in hogs:
        hog.start()
    try:
        yield
    finally:
        for hog in hogs:
            hog.terminate()
            hog.join()


def milliseconds(values: list[float]) -> str:
    if not values:
        return "none"
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
    return f"median {statistics.median(values) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {values[-1] * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service instead of starting one")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--cap", type=int, default=32, help="MAX_CONCURRENT_REQUESTS of the started service")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8014)
    parser.add_argument("--hog", type=int, default=0, help="busy processes on the machine during the bursts")
    parser.add_argument("--refusal-ms", type=float, default=100, help="the verdict's bound on every 429's latency")
    parser.add_argument(
        "--deadline-s", type=float, default=30, help="the verdict's bound on every answer (MAX_GENERATION_TIME's default)"
    )
    args = parser.parse_args()
    with (
        served(args.url, args.port, {"MAX_CONCURRENT_REQUESTS": str(args.cap)}, ".burst.log") as (url, _),
        cpu_hog(args.hog),
    ):
        time.sleep(3 if args.hog else 0)
        for _ in range(3):  # the engine learns its rate on the machine as it is now
            httpx.post(f"{url}/generate", content=BODY, headers={"content-type": "application/json"}, timeout=60)
        clean = True
        for round_number in range(1, args.rounds + 1):
            results = asyncio.run(burst(url, args.requests))
            statuses = collections.Counter(status for status, _ in results)
            after = httpx.post(f"{url}/generate", content=BODY, headers={"content-type": "application/json"}, timeout=60)
            print(f"round {round_number}: {dict(sorted(statuses.items()))}; right after: {after.status_code}")
            print(f"  429: {milliseconds([seconds for status, seconds in results if status == 429])}")
            print(f"  200: {milliseconds([seconds for status, seconds in results if status == 200])}")
            refusals_in_time = all(seconds * 1000 < args.refusal_ms for status, seconds in results if status == 429)
            answers_in_time = all(seconds < args.deadline_s for status, seconds in results if status == 200)
            clean &= set(statuses) <= {200, 429} and refusals_in_time and answers_in_time and after.status_code == 200
    print(
        "verdict:",
        "PASS" if clean else "FAIL",
        f"(only 200 and 429, every 429 in under {args.refusal_ms:g} ms, every 200 in under {args.deadline_s:g} s, "
        "and a normal answer right after)",
    )
    sys.exit(0 if clean else 1)


if __name__ == "__main__":
    main()
