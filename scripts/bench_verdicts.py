"""Verdicts (issue 13): what a yes/no decision costs, the batch form, logprobs and JSON schemas on a
batch step, and an interactive verdict's latency under a saturating bulk load.

    python scripts/bench_verdicts.py               # starts `bentoml serve` on a free port
    python scripts/bench_verdicts.py --url http://127.0.0.1:8003   # a running one (MAX_NEW_TOKENS >= 20)
    python scripts/bench_verdicts.py --quick       # smaller counts: a smoke run, not a measurement

Sections, each printed as a markdown table:
1. sequential latency of POST /classify (yes/no) against /generate of exactly 1 and exactly 10 tokens;
2. items/s of the batch form (`items`, 64 of them) of /generate and /classify against 64 single
   requests sent at once;
3. 32 concurrent /v1/chat/completions, plain, with logprobs (top 5) and with a JSON schema, as output
   tokens/s, latency per output token and the engine's time per output token (from /metrics);
4. sequential /classify, idle and while 64 clients keep /generate's queue full, with priorities
   (interactive against batch) and without.

Every post carries its own serial number, so no two prompts are the same: the response cache never
answers, and the prefix cache holds only what every kind shares (system prompt, question, "[1] Post #").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from serving import QUESTIONS, ROOT, STANCES, TOPICS, percentile, served

YES_NO_QUESTIONS = [question for question in QUESTIONS if "yes or no" in question]
LABELS = ["yes", "no"]
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 10}},
    "required": ["verdict", "score"],
    "additionalProperties": False,
}
# Section 3 asks for 20 tokens; everything else stays at its default.
SERVER_ENV = {"MAX_NEW_TOKENS": "64"}
METRIC_PREFIX = "ai_model_"
PROBE_GAP_S = 0.2
NAN = float("nan")
serials = itertools.count(1)


def cpu_model() -> str:
    """Read here rather than through engine.layers.kernels, which imports torch: the client shares the CPU."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@contextlib.contextmanager
def private_home() -> Iterator[str]:
    """A BENTOML_HOME of the started server's own, on the checkout's model store. BentoML empties
    $BENTOML_HOME/prometheus_multiproc_dir when a server starts, so a test or bench started from the
    checkout meanwhile would otherwise reset this server's /metrics mid-run."""
    store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml")) / "models"
    with tempfile.TemporaryDirectory(prefix="bench-verdicts-") as home:
        (Path(home) / "models").symlink_to(store.resolve())
        yield home


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post_text(rng: random.Random) -> str:
    return f"Post #{next(serials)} about {rng.choice(TOPICS)}: {rng.choice(STANCES)}"


def verdict(rng: random.Random) -> dict:
    """A short_request-like body (~70 prompt tokens) with a post no other request has."""
    return {"query": rng.choice(YES_NO_QUESTIONS), "context": [post_text(rng)]}


def quantile(values: list[float], q: float) -> float:
    """percentile, or NaN where nothing was answered: a failing route still gets its row."""
    return percentile(values, q) if values else NAN


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else NAN


def median(values: list[float]) -> float:
    return statistics.median(values) if values else NAN


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else NAN


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def percent_more(factor: float) -> str:
    return f"{(factor - 1) * 100:+.0f}%"


def spread(samples: list[float]) -> str:
    return f"{mean(samples):.0f} ({min(samples):.0f}-{max(samples):.0f})" if samples else "-"


def table(header: list[str], rows: list[list[str]]) -> None:
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if index == 0 else "---:" for index in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


@dataclass
class Reply:
    latency_s: float
    ok: bool
    body: dict


class Client:
    """aiohttp, as in bench.py (half httpx's CPU on this 2-core host). Remembers the first failure of each
    route and kind, with its request, for the report."""

    def __init__(self, url: str) -> None:
        self.session = aiohttp.ClientSession(
            base_url=url, timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(limit=0)
        )
        self.problems: dict[tuple[str, str], str] = {}

    async def close(self) -> None:
        await self.session.close()

    async def post(self, path: str, body: dict) -> Reply:
        started = time.perf_counter()
        try:
            async with self.session.post(path, json=body) as response:
                text, status = await response.text(), str(response.status)
        except aiohttp.ClientError as error:
            text, status = repr(error), "connection error"
        latency = time.perf_counter() - started
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if status != "200" or not isinstance(data, dict):
            self.problem(path, status, body, text)
            return Reply(latency, False, {})
        return Reply(latency, True, data)

    def problem(self, path: str, kind: str, body: dict, answer: str) -> None:
        self.problems.setdefault((path, kind), f"POST {path} {json.dumps(body)[:600]}\n  -> {kind}: {answer[:600]}")

    async def metrics(self) -> dict[str, float]:
        """The service's /metrics samples, summed over their labels."""
        async with self.session.get("/metrics") as response:
            text = await response.text()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(METRIC_PREFIX):
                sample, _, value = line.rpartition(" ")
                name = sample.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(value)
        return values


# 1. A decision against generation, one request at a time.


async def decision_latency(client: Client, count: int, rng: random.Random) -> None:
    kinds = [  # name, route, fields, the completion tokens it must answer with
        ("/classify yes/no", "/classify", {"labels": LABELS}, None),
        ("/generate 1 token", "/generate", {"max_length": 1, "min_tokens": 1, "temperature": 0}, 1),
        ("/generate 10 tokens", "/generate", {"max_length": 10, "min_tokens": 10, "temperature": 0}, 10),
    ]
    posts = [(rng.choice(YES_NO_QUESTIONS), f"about {rng.choice(TOPICS)}: {rng.choice(STANCES)}") for _ in range(count)]
    replies: dict[str, list[Reply]] = {}
    for name, path, fields, tokens in kinds:
        for _ in range(3):
            await client.post(path, {**verdict(rng), **fields})
        # The same questions and posts for every kind; the serial keeps each prompt its own.
        bodies = [{"query": query, "context": [f"Post #{next(serials)} {post}"], **fields} for query, post in posts]
        answered = [(body, await client.post(path, body)) for body in bodies]
        replies[name] = [reply for _, reply in answered if reply.ok]
        for body, reply in answered:
            given = reply.body.get("completion_tokens")
            if reply.ok and tokens is not None and given != tokens:
                client.problem(path, f"completion_tokens {given}", body, json.dumps(reply.body))
        progress(f"1: {name} done")
    rows = []
    for name, answers in replies.items():
        latencies = [reply.latency_s for reply in answers]
        engine_ms = [reply.body.get("decision_time_ms", reply.body.get("generation_time_ms")) for reply in answers]
        rows.append([
            name, str(len(answers)),
            f"{mean([reply.body['prompt_tokens'] for reply in answers]):.1f}",
            f"{mean([reply.body['cached_prompt_tokens'] for reply in answers]):.1f}",
            f"{mean([reply.body.get('completion_tokens', 0) for reply in answers]):.1f}",
            ms(quantile(latencies, 0.5)), ms(quantile(latencies, 0.95)), f"{quantile(engine_ms, 0.5):.0f}",
        ])
    print("\n### 1. A decision's latency against generation (sequential)")
    table(["request", "n", "prompt tok", "cached tok", "out tok", "p50 ms", "p95 ms", "engine p50 ms"], rows)
    decision, one = ([reply.latency_s for reply in replies[name]] for name in ("/classify yes/no", "/generate 1 token"))
    print(
        f"\ndecision / 1-token: p50 {ratio(quantile(decision, 0.5), quantile(one, 0.5)):.2f}x, "
        f"p95 {ratio(quantile(decision, 0.95), quantile(one, 0.95)):.2f}x"
    )


# 2. The batch form against single requests sent at once.


async def batch_form(client: Client, items: int, repeats: int, rng: random.Random) -> None:
    question = YES_NO_QUESTIONS[0]
    shapes = {
        "/generate max_length 5": ("/generate", {"max_length": 5, "temperature": 0}),
        "/classify yes/no": ("/classify", {"labels": LABELS}),
    }

    async def batch(path: str, fields: dict) -> int:
        body = {"query": question, "items": [{"context": [post_text(rng)]} for _ in range(items)], **fields}
        reply = await client.post(path, body)
        results = reply.body.get("results", []) if reply.ok else []
        failed = [result for result in results if "error_type" in result]
        if failed or (reply.ok and len(results) != items):
            shown = {**body, "items": f"[{items} items]"}
            client.problem(path, "batch item", shown, json.dumps(failed[:1] or reply.body)[:600])
        return len(results) - len(failed)

    async def singles(path: str, fields: dict) -> int:
        bodies = [{"query": question, "context": [post_text(rng)], **fields} for _ in range(items)]
        return sum(reply.ok for reply in await asyncio.gather(*(client.post(path, body) for body in bodies)))

    for path, fields in shapes.values():  # warm both forms
        await batch(path, fields)
        await singles(path, fields)
    rates: dict[tuple[str, str], list[float]] = {}
    unanswered: dict[tuple[str, str], int] = {}
    for _ in range(repeats):
        for name, (path, fields) in shapes.items():
            for form, send in (("batch", batch), ("singles", singles)):
                started = time.perf_counter()
                answered = await send(path, fields)
                rates.setdefault((name, form), []).append(answered / (time.perf_counter() - started))
                unanswered[(name, form)] = unanswered.get((name, form), 0) + items - answered
        progress("2: repeat done")
    rows = []
    for name in shapes:
        together, apart = rates[(name, "batch")], rates[(name, "singles")]
        rows.append([
            name, f"{max(together):.1f}", f"{median(together):.1f}", f"{max(apart):.1f}", f"{median(apart):.1f}",
            f"{ratio(median(together), median(apart)):.2f}x",
            f"{unanswered[(name, 'batch')]} / {unanswered[(name, 'singles')]}",
        ])
    print(f"\n### 2. The batch form: {items} items in one request against {items} requests at once ({repeats} repeats)")
    table(
        ["request", "batch best items/s", "median", "singles best items/s", "median", "batch/singles (median)",
         "failed items batch / singles"],
        rows,
    )


# 3. Logprobs and a JSON schema on a batch step.


@dataclass
class VariantRuns:
    tokens_per_s: list[float] = field(default_factory=list)
    latency_per_token_s: list[float] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    engine_tpot_sum_s: float = 0.0
    engine_tpot_count: float = 0.0
    valid: int = 0
    answered: int = 0

    def engine_tpot_s(self) -> float:
        return ratio(self.engine_tpot_sum_s, self.engine_tpot_count)


def valid_answer(variant: str, body: dict) -> bool:
    """Exactly 20 tokens without a grammar; with logprobs, 5 alternatives for each; with the schema, the JSON."""
    choice, tokens = body["choices"][0], body["usage"]["completion_tokens"]
    if variant == "json_schema":
        try:
            answer = json.loads(choice["message"]["content"])
        except json.JSONDecodeError:
            return False
        return set(answer) == {"verdict", "score"} and answer["verdict"] in LABELS and 0 <= answer["score"] <= 10
    if variant == "logprobs, top 5":
        content = (choice.get("logprobs") or {}).get("content") or []
        return tokens == 20 and len(content) == 20 and all(len(token["top_logprobs"]) == 5 for token in content)
    return tokens == 20


async def logprobs_and_schema(
    client: Client, model_id: str, concurrency: int, repeats: int, rng: random.Random
) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA}}
    variants = {
        "plain": {"min_tokens": 20},
        "logprobs, top 5": {"min_tokens": 20, "logprobs": True, "top_logprobs": 5},
        "json_schema": {"response_format": schema_format},  # no min_tokens: the answer ends when the JSON closes
    }
    runs = {name: VariantRuns() for name in variants}
    tpot = f"{METRIC_PREFIX}time_per_output_token_seconds"

    def body(extra: dict) -> dict:
        question = rng.choice(YES_NO_QUESTIONS).replace("Answer yes or no.", "")
        ask = "Answer as JSON with a verdict (yes or no) and a score from 0 to 10."
        content = f"{question}{ask}\n\nPost: {post_text(rng)}"
        messages = [{"role": "user", "content": content}]
        return {"model": model_id, "messages": messages, "max_tokens": 20, "temperature": 0, **extra}

    for extra in variants.values():  # warm each variant (the schema's grammar compiles once)
        await asyncio.gather(*(client.post("/v1/chat/completions", body(extra)) for _ in range(4)))
    for _ in range(repeats):
        for name, extra in variants.items():
            before = await client.metrics()
            bodies = [body(extra) for _ in range(concurrency)]
            started = time.perf_counter()
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", sent) for sent in bodies))
            wall = time.perf_counter() - started
            after = await client.metrics()
            run = runs[name]
            for sent, reply in zip(bodies, replies):
                if reply.ok and not valid_answer(name, reply.body):
                    client.problem("/v1/chat/completions", f"invalid {name}", sent, json.dumps(reply.body))
            answered = [reply for reply in replies if reply.ok]
            tokens = [reply.body["usage"]["completion_tokens"] for reply in answered]
            run.answered += len(answered)
            run.valid += sum(valid_answer(name, reply.body) for reply in answered)
            run.completion_tokens += tokens
            run.tokens_per_s.append(sum(tokens) / wall)
            run.latency_per_token_s.append(ratio(mean([reply.latency_s for reply in answered]), mean(tokens)))
            run.engine_tpot_sum_s += after.get(f"{tpot}_sum", 0) - before.get(f"{tpot}_sum", 0)
            run.engine_tpot_count += after.get(f"{tpot}_count", 0) - before.get(f"{tpot}_count", 0)
        progress("3: repeat done")
    plain = runs["plain"]
    rows = []
    for name, run in runs.items():
        rate, per_token = median(run.tokens_per_s), median(run.latency_per_token_s)
        rows.append([
            name, f"{run.valid}/{run.answered}", f"{mean(run.completion_tokens):.1f}",
            f"{rate:.1f}", percent_more(ratio(median(plain.tokens_per_s), rate)),
            f"{per_token * 1000:.1f}", percent_more(ratio(per_token, median(plain.latency_per_token_s))),
            f"{run.engine_tpot_s() * 1000:.1f}", percent_more(ratio(run.engine_tpot_s(), plain.engine_tpot_s())),
        ])
    print(
        f"\n### 3. Logprobs and a JSON schema: {concurrency} concurrent /v1/chat/completions, max_tokens 20, "
        f"temperature 0 (median of {repeats})"
    )
    table(
        ["variant", "valid/answered", "out tok/request", "out tok/s", "time/token vs plain", "latency/out tok ms",
         "vs plain", "engine TPOT ms", "vs plain"],
        rows,
    )


# 4. Priority: interactive verdicts under a saturating bulk load.


@dataclass
class LoadedRun:
    probes_s: list[float]
    bulk_per_s: float
    bulk_failed: int
    queue_depths: list[float]
    batch_sizes: list[float]


def with_priority(body: dict, priority: str | None) -> dict:
    return body if priority is None else {**body, "priority": priority}


async def probe(client: Client, count: int, priority: str | None, rng: random.Random) -> list[float]:
    latencies = []
    for _ in range(count):
        reply = await client.post("/classify", with_priority({**verdict(rng), "labels": LABELS}, priority))
        if reply.ok:
            latencies.append(reply.latency_s)
        await asyncio.sleep(PROBE_GAP_S)
    return latencies


async def under_bulk_load(
    client: Client, clients: int, probes: int, probe_priority: str | None, bulk_priority: str | None, rng: random.Random
) -> LoadedRun:
    stop = asyncio.Event()
    finished: list[float] = []
    failed = 0
    samples: list[dict[str, float]] = []

    async def bulk_client() -> None:
        nonlocal failed
        while not stop.is_set():
            body = {**verdict(rng), "max_length": 10, "min_tokens": 10, "temperature": 0}
            reply = await client.post("/generate", with_priority(body, bulk_priority))
            if reply.ok:
                finished.append(time.perf_counter())
            else:
                failed += 1

    async def watch() -> None:
        while not stop.is_set():
            samples.append(await client.metrics())
            await asyncio.sleep(1.0)

    bulk = [asyncio.create_task(bulk_client()) for _ in range(clients)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (await client.metrics()).get(f"{METRIC_PREFIX}queue_depth", 0.0) == 0:
        await asyncio.sleep(0.5)  # until the batch is full and requests wait
    await asyncio.sleep(2.0)
    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    latencies = await probe(client, probes, probe_priority, rng)
    ended = time.perf_counter()
    stop.set()
    await asyncio.gather(*bulk, watcher)  # each bulk client ends its request in flight
    return LoadedRun(
        latencies,
        sum(started <= moment <= ended for moment in finished) / (ended - started),
        failed,
        [sample.get(f"{METRIC_PREFIX}queue_depth", NAN) for sample in samples],
        [sample.get(f"{METRIC_PREFIX}batch_size", NAN) for sample in samples],
    )


async def priority_under_load(client: Client, clients: int, probes: int, rng: random.Random) -> None:
    idle = await probe(client, probes, "interactive", rng)
    progress("4: idle done")
    prioritized = await under_bulk_load(client, clients, probes, "interactive", "batch", rng)
    progress("4: loaded, with priorities, done")
    unprioritized = await under_bulk_load(client, clients, probes, None, None, rng)
    progress("4: loaded, without priorities, done")
    idle_p95 = quantile(idle, 0.95)
    rows = [["idle", "interactive", "-", str(len(idle)), ms(quantile(idle, 0.5)), ms(idle_p95), "1.00x"] + ["-"] * 4]
    loaded = ((prioritized, "interactive", "batch"), (unprioritized, "none (normal)", "none (normal)"))
    for run, probe_priority, bulk_priority in loaded:
        rows.append([
            f"{clients} bulk clients", probe_priority, bulk_priority, str(len(run.probes_s)),
            ms(quantile(run.probes_s, 0.5)), ms(quantile(run.probes_s, 0.95)),
            f"{ratio(quantile(run.probes_s, 0.95), idle_p95):.2f}x", f"{run.bulk_per_s:.1f}", str(run.bulk_failed),
            spread(run.queue_depths), spread(run.batch_sizes),
        ])
    print(
        f"\n### 4. Priority: sequential /classify ({PROBE_GAP_S:g} s apart), idle and under {clients} clients "
        "looping /generate (max_length 10, min_tokens 10)"
    )
    table(
        ["load", "/classify priority", "bulk priority", "n", "p50 ms", "p95 ms", "p95 / idle p95", "bulk req/s",
         "bulk failed", "queue depth mean (min-max)", "batch size mean (min-max)"],
        rows,
    )


async def bench(url: str, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    client = Client(url)
    try:
        async with client.session.get("/models") as response:
            model_id = (await response.json())["default_model_id"]
        if 1 in args.sections:
            await decision_latency(client, args.requests, rng)
        if 2 in args.sections:
            await batch_form(client, args.items, args.repeats, rng)
        if 3 in args.sections:
            await logprobs_and_schema(client, model_id, args.chat_concurrency, args.repeats, rng)
        if 4 in args.sections:
            await priority_under_load(client, args.bulk_clients, args.probes, rng)
    finally:
        await client.close()
        if client.problems:
            print("\nproblems (the first of each route and kind):")
            for description in client.problems.values():
                print(f"- {description}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="bench a running service instead of starting one")
    parser.add_argument("--port", type=int, help="port of the started service; default a free one")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of sections 2 and 3")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per kind in section 1")
    parser.add_argument("--items", type=int, default=64, help="items per batch request in section 2")
    parser.add_argument("--chat-concurrency", type=int, default=32)
    parser.add_argument("--bulk-clients", type=int, default=64)
    parser.add_argument("--probes", type=int, default=30, help="/classify requests per case in section 4")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--sections", type=int, nargs="+", choices=(1, 2, 3, 4), default=[1, 2, 3, 4], help="which sections to run"
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke run, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.requests, args.items, args.chat_concurrency, args.probes = 1, 6, 16, 8, 5

    # Other work on the host skews every figure: the load average says whether there was any.
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    print(f"command: python scripts/bench_verdicts.py {' '.join(sys.argv[1:])}".rstrip())
    settings = " ".join(f"{name}={value}" for name, value in SERVER_ENV.items())
    print(f"server: {args.url or f'started with {settings}, else defaults'}")
    sys.stdout.flush()
    with private_home() as home:
        env = {**SERVER_ENV, "BENTOML_HOME": home}
        with served(args.url, args.port or free_port(), env, ".bench-verdicts.log") as (url, _):
            asyncio.run(bench(url, args))


if __name__ == "__main__":
    main()
