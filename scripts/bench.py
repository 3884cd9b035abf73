"""Throughput and latency of the service under concurrent load, batching on against batching off.

    python scripts/bench.py                        # starts the service twice (batched, MAX_BATCH_SIZE=1)
    python scripts/bench.py --url http://host:8003 --modes as-is   # a running one, started with RESPONSE_CACHE_SIZE=0
    python scripts/bench.py --quick                # fewer requests, for a smoke run

Every request goes through POST /generate/stream, so each one gives its time to first token as well
as its latency. Workloads: "short" is classification prompts of 40-80 tokens answered with at most
10 new tokens; "long" asks for 128 new tokens. While the long case runs at concurrency 8 the bench
also sends short requests one by one and reports their latency against a short request alone.
Prints one table, then the on/off ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from serving import ROOT, percentile, short_request, start_service, stop_service

LONG_TOPICS = ["the history of bridges", "how rivers shape valleys", "the life of honey bees", "why cities grow", "how bread is made"]


def long_request(rng: random.Random) -> dict:
    query = f"Write a long, detailed essay about {rng.choice(LONG_TOPICS)}, with many examples."
    return {"query": query, "max_length": 128, "temperature": 0}


@dataclass
class Result:
    latency_s: float
    ttft_s: float
    completion_tokens: int
    prompt_tokens: int
    ok: bool


@dataclass
class Cell:
    case: str
    concurrency: int
    mode: str
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    def requests_per_s(self) -> float:
        return len(self.ok()) / self.wall_s

    def tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.ok()) / self.wall_s

    def latency(self, q: float) -> float:
        return percentile([r.latency_s for r in self.ok()], q)

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok()], q)


async def one_request(session: aiohttp.ClientSession, body: dict) -> Result:
    started = time.perf_counter()
    first = None
    try:
        async with session.post("/generate/stream", json=body) as response:
            if response.status != 200:
                await response.read()
                return Result(time.perf_counter() - started, 0.0, 0, 0, False)
            async for line in response.content:  # one server-sent-event line at a time
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if "text" in event and first is None:
                    first = time.perf_counter()
                if "error" in event:
                    return Result(time.perf_counter() - started, 0.0, 0, 0, False)
                if event.get("done"):
                    end = time.perf_counter()
                    return Result(end - started, (first or end) - started, event["completion_tokens"], event["prompt_tokens"], True)
    except aiohttp.ClientError:
        pass
    return Result(time.perf_counter() - started, 0.0, 0, 0, False)


def client_session(url: str, connections: int = 0) -> aiohttp.ClientSession:
    """aiohttp: on a 2-core machine the load generator shares the CPU with the service, and with
    httpx this client took twice the CPU (0.82 against 0.41 s for 264 streamed requests)."""
    return aiohttp.ClientSession(
        base_url=url, timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=connections)
    )


async def run_cell(url: str, case: str, concurrency: int, count: int, mode: str, seed: int) -> Cell:
    rng = random.Random(seed)
    make = short_request if case == "short" else long_request
    bodies = [make(rng) for _ in range(count)]
    cell = Cell(case, concurrency, mode)
    gate = asyncio.Semaphore(concurrency)
    async with client_session(url, concurrency + 4) as session:

        async def gated(body: dict) -> Result:
            async with gate:
                return await one_request(session, body)

        started = time.perf_counter()
        cell.results = await asyncio.gather(*(gated(body) for body in bodies))
        cell.wall_s = time.perf_counter() - started
    return cell


async def short_while_long(url: str, long_concurrency: int, long_count: int, probes: int, seed: int) -> tuple[Cell, list[float]]:
    """The long case at `long_concurrency`, with short requests sent one at a time while it runs."""
    rng = random.Random(seed + 1)
    probe_latencies: list[float] = []
    long_task = asyncio.create_task(run_cell(url, "long", long_concurrency, long_count, "", seed))
    await asyncio.sleep(2.0)  # let the long requests fill the batch
    async with client_session(url) as session:
        for _ in range(probes):
            if long_task.done():
                break
            result = await one_request(session, short_request(rng))
            if result.ok:
                probe_latencies.append(result.latency_s)
    return await long_task, probe_latencies


def warm_up(url: str) -> None:
    asyncio.run(run_cell(url, "short", 4, 8, "", seed=999))


def bench_mode(url: str, mode: str, args: argparse.Namespace) -> tuple[list[Cell], list[float], float]:
    warm_up(url)
    cells = []
    for concurrency in args.concurrency:
        count = max(args.min_requests, args.requests_per_slot * concurrency)
        cells.append(asyncio.run(run_cell(url, "short", concurrency, count, mode, args.seed)))
        print(f"  {mode}: short c={concurrency} done ({count} requests)", file=sys.stderr, flush=True)
    lone_short = cells[0].latency(0.5) if cells and cells[0].concurrency == 1 else float("nan")
    probes: list[float] = []
    for concurrency in args.long_concurrency:
        count = max(4, args.long_requests_per_slot * concurrency)
        if concurrency == 8:
            cell, probes = asyncio.run(short_while_long(url, concurrency, count, args.probes, args.seed))
        else:
            cell = asyncio.run(run_cell(url, "long", concurrency, count, mode, args.seed))
        cell.mode = mode
        cells.append(cell)
        print(f"  {mode}: long c={concurrency} done ({count} requests)", file=sys.stderr, flush=True)
    return cells, probes, lone_short


def plain_generate_baseline(count: int, seed: int) -> list[Cell]:
    """The peer the issue measured: one `model.generate` per request, one request at a time, in
    process (no HTTP), on the same prompts; a server built on it serves at this rate whatever the
    concurrency."""
    import bentoml
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from settings import get_settings

    torch.set_num_threads(min(4, len(os.sched_getaffinity(0))))
    path = bentoml.models.get(get_settings().default_model_id).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = get_settings().prompt_builder
    cells = []
    for case, make, per in (("short", short_request, count), ("long", long_request, max(2, count // 6))):
        rng = random.Random(seed)
        cell = Cell(case, 1, "plain generate")
        started = time.perf_counter()
        for _ in range(per):
            body = make(rng)
            text = tokenizer.apply_chat_template(
                prompts.build(body["query"], body.get("context", [])).to_list(), tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            begun = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(
                    ids, max_new_tokens=body["max_length"], do_sample=False, pad_token_id=tokenizer.eos_token_id,
                    temperature=None, top_p=None, top_k=None,
                )
            latency = time.perf_counter() - begun
            cell.results.append(Result(latency, latency, output.shape[1] - ids.shape[1], ids.shape[1], True))
        cell.wall_s = time.perf_counter() - started
        cells.append(cell)
    return cells


def print_table(cells: list[Cell]) -> None:
    print()
    print("| case | conc | mode | ok/sent | req/s | out tok/s | p50 s | p95 s | TTFT p50 s | TTFT p95 s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        print(
            f"| {c.case} | {c.concurrency} | {c.mode} | {len(c.ok())}/{len(c.results)} | {c.requests_per_s():.2f} | "
            f"{c.tokens_per_s():.1f} | {c.latency(0.5):.2f} | {c.latency(0.95):.2f} | {c.ttft(0.5):.2f} | {c.ttft(0.95):.2f} |"
        )


def print_ratios(cells: list[Cell], on: str, off: str) -> None:
    by_key = {(c.case, c.concurrency, c.mode): c for c in cells}
    print()
    print(f"| case | conc | throughput {on}/{off} | p50 {on}/{off} | p95 {on}/{off} |")
    print("|---|---:|---:|---:|---:|")
    for (case, concurrency, mode), cell in by_key.items():
        other = by_key.get((case, concurrency, off))
        if mode != on or other is None:
            continue
        print(
            f"| {case} | {concurrency} | {cell.requests_per_s() / other.requests_per_s():.2f}x | "
            f"{cell.latency(0.5) / other.latency(0.5):.2f} | {cell.latency(0.95) / other.latency(0.95):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="bench a running service instead of starting one")
    parser.add_argument("--modes", nargs="+", default=["batched", "unbatched"], help="batched, unbatched, or as-is with --url")
    parser.add_argument("--concurrency", nargs="*", type=int, default=[1, 8, 32])
    parser.add_argument("--long-concurrency", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--requests-per-slot", type=int, default=3, help="short requests per unit of concurrency")
    parser.add_argument("--min-requests", type=int, default=12)
    parser.add_argument("--long-requests-per-slot", type=int, default=2)
    parser.add_argument("--probes", type=int, default=5, help="short requests sent during the long c=8 case")
    parser.add_argument("--port", type=int, default=8013)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke run, not a measurement")
    parser.add_argument("--env", nargs="*", default=[], help="extra NAME=VALUE settings for the started service")
    parser.add_argument("--baseline", action="store_true", help="also time plain per-request model.generate in process")
    args = parser.parse_args()
    if args.quick:
        args.requests_per_slot, args.min_requests, args.long_requests_per_slot, args.probes = 1, 4, 1, 2

    os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    # No response cache: the prompts repeat, and every request should reach the engine.
    base_env = {
        "MAX_NEW_TOKENS": "128",
        "MAX_GENERATION_TIME": "600",
        "RESPONSE_CACHE_SIZE": "0",
        **dict(item.split("=", 1) for item in args.env),
    }
    mode_env = {"batched": {}, "unbatched": {"MAX_BATCH_SIZE": "1"}}
    cells: list[Cell] = []
    probe_report = []
    for mode in args.modes:
        print(f"benchmarking {mode} ...", file=sys.stderr, flush=True)
        if args.url:
            mode_cells, probes, lone = bench_mode(args.url, mode, args)
        else:
            log = ROOT / f".bench-{mode}.log"
            process = start_service({**base_env, **mode_env[mode]}, args.port, log)
            try:
                mode_cells, probes, lone = bench_mode(f"http://127.0.0.1:{args.port}", mode, args)
            finally:
                stop_service(process)
        cells += mode_cells
        if probes:
            probe_report.append((mode, lone, probes))
    if args.baseline:
        print("timing plain model.generate ...", file=sys.stderr, flush=True)
        cells += plain_generate_baseline(args.min_requests, args.seed)
    print(f"\nbenchmark: {' '.join(sys.argv[1:]) or '(defaults)'}; {os.cpu_count()} CPUs")
    print_table(cells)
    if len(args.modes) == 2:
        print_ratios(cells, args.modes[0], args.modes[1])
    for mode, lone, probes in probe_report:
        print(
            f"\n{mode}: short requests during the long c=8 case: median {statistics.median(probes):.2f} s over "
            f"{len(probes)}, against {lone:.2f} s alone ({statistics.median(probes) / lone:.2f}x)"
        )


if __name__ == "__main__":
    main()
