"""QUANTIZATION=none against int8 on the bundled model, both loaded in this one process through the
engine's own repository and batch scheduler (no HTTP).

    python scripts/bench_quantization.py              # 3 interleaved rounds
    python scripts/bench_quantization.py --rounds 1   # a smoke run

Memory: after one warm-up load (imports and first-use costs), each way is loaded alone with a
64 MB KV cache, answers one request (so every weight page is touched), and its weights (the
model's own count), the process's RSS growth and the highest RSS during the load are read; then
it is unloaded. Speed:
both are loaded side by side and measured in turns, the order flipping every round, so the ratios
hold while the machine's speed drifts:
- verdict latency: one short classification prompt, at most 10 new tokens, greedy, median of 5;
- decode tok/s at batch 1: one long generation, tokens after the first over the time after it;
- decode tok/s at 8: eight long generations at once, all their tokens after each one's first,
  over the time from the last first token to the last finish.
Prints one table with the medians over the rounds, and the int8/none ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

from serving import short_request, use_the_checkout_in_process

MODES = ("none", "int8")
STORIES = ["a dragon", "a lighthouse keeper", "a lost robot", "two rival bakers", "a river", "a winter journey",
           "a clockmaker", "a city under the sea"]


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


async def verdict_latency_s(repository, model_id: str, prompts, params) -> float:
    times = []
    for prompt in prompts:
        started = time.perf_counter()
        await repository.generate_text(model_id, prompt, params)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def decode_tokens_per_s(repository, model_id: str, prompts, params) -> float:
    """Tokens after each sequence's first, over the time from the last first token to the last finish."""
    started = time.perf_counter()
    generations = await asyncio.gather(*(repository.generate_text(model_id, prompt, params) for prompt in prompts))
    finished = time.perf_counter() - started
    last_first_token = max(generation.time_to_first_token_s for generation in generations)
    decoded = sum(generation.completion_tokens - 1 for generation in generations)
    return decoded / (finished - last_first_token)


class PeakRss:
    """The highest RSS seen while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakRss:
        self.peak_mb, self._done = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak_mb = max(self.peak_mb, rss_mb())

    def __exit__(self, *_) -> None:
        self._done.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))))
    args = parser.parse_args()

    use_the_checkout_in_process()
    import torch

    from domain import GenerationParams
    from engine.models.catalog import BentoModelStoreCatalog
    from engine.models.loader import BatchingOptions
    from engine.models.memory import MemoryLimits, release_freed_memory
    from engine.repository import TransformersModelRepository
    from settings import get_settings

    torch.set_num_threads(args.threads)
    model_id = get_settings().default_model_id
    builder = get_settings().prompt_builder
    rng = random.Random(7)
    verdicts = [builder.build(r["query"], r["context"]) for r in (short_request(rng) for _ in range(5))]
    stories = [builder.build(f"Write a long story about {topic}.", []) for topic in STORIES]
    verdict_params = GenerationParams(max_new_tokens=10, temperature=0.0, timeout_s=600)
    decode_params = GenerationParams(max_new_tokens=args.decode_tokens, temperature=0.0, timeout_s=600)
    limits = MemoryLimits(max_usage_fraction=0.95, min_free_gb=0.5, gpu_memory_fraction=0.8)
    batching = BatchingOptions(max_batch_size=32, kv_cache_bytes=64 * 2**20)
    executor = ThreadPoolExecutor(4)
    catalog = BentoModelStoreCatalog()
    repositories = {
        mode: TransformersModelRepository(catalog, executor, limits, batching=batching, quantization_setting=mode)
        for mode in MODES
    }

    def load_and_answer(mode: str) -> None:
        asyncio.run(repositories[mode].load_model(model_id, "cpu"))
        asyncio.run(repositories[mode].generate_text(model_id, verdicts[0], verdict_params))

    load_and_answer("none")
    asyncio.run(repositories["none"].unload_model(model_id))
    memory = {}
    for mode in MODES:
        release_freed_memory()
        before = rss_mb()
        with PeakRss() as load:
            load_and_answer(mode)
        release_freed_memory()
        weights_mb = repositories[mode].loaded(model_id).memory_bytes / 2**20
        growth_mb, peak_mb = rss_mb() - before, load.peak_mb - before
        memory[mode] = (weights_mb, growth_mb, peak_mb)
        asyncio.run(repositories[mode].unload_model(model_id))
        print(f"{mode}: weights {weights_mb:.0f} MB, RSS +{growth_mb:.0f} MB, peak +{peak_mb:.0f} MB", file=sys.stderr)

    for mode in MODES:
        load_and_answer(mode)
    samples: dict[str, dict[str, list[float]]] = {mode: {"latency": [], "decode1": [], "decode8": []} for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES if round_index % 2 == 0 else reversed(MODES):
            repository, measured = repositories[mode], samples[mode]
            measured["latency"].append(asyncio.run(verdict_latency_s(repository, model_id, verdicts, verdict_params)))
            for key, prompts in (("decode1", stories[:1]), ("decode8", stories)):
                measured[key].append(asyncio.run(decode_tokens_per_s(repository, model_id, prompts, decode_params)))
            print(f"round {round_index + 1} {mode}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in measured.items()),
                  file=sys.stderr, flush=True)
    for mode in MODES:
        asyncio.run(repositories[mode].unload_model(model_id))

    median = {mode: {key: statistics.median(values) for key, values in samples[mode].items()} for mode in MODES}
    print("| QUANTIZATION | weights MB | RSS growth MB | RSS peak in load MB | verdict latency s "
          "| decode tok/s, batch 1 | decode tok/s, 8 at once |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        (weights, growth, peak), m = memory[mode], median[mode]
        speed = f"{m['latency']:.3f} | {m['decode1']:.1f} | {m['decode8']:.1f}"
        print(f"| {mode} | {weights:.0f} | {growth:.0f} | {peak:.0f} | {speed} |")
    ratios = [memory["int8"][i] / memory["none"][i] for i in range(3)]
    ratios += [median["int8"][key] / median["none"][key] for key in ("latency", "decode1", "decode8")]
    print("| int8/none | " + " | ".join(f"{ratio:.2f}x" for ratio in ratios) + " |")
    threads = torch.get_num_threads()
    print(f"\n{args.rounds} interleaved rounds, medians; {threads} torch threads, torch {torch.__version__}")
    executor.shutdown()


if __name__ == "__main__":
    main()
