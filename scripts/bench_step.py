"""Where a batch step's time goes: the engine's scheduler and model runner driven directly, in this
process, with no HTTP and no engine thread, on the bundled default model as the service loads it.

    python scripts/bench_step.py                       # decode steps at 1 and 32 rows, then the long workload
    python scripts/bench_step.py --breakdown           # and the time in each kind of module
    python scripts/bench_step.py --rows 8 --context 300 --workload 0

- decode step: `--rows` sequences of `--context` distinct prompt tokens are prefilled, then the
  median of `--steps` decode steps is timed (the model's forward, sampling and the scheduler's
  bookkeeping);
- with --breakdown, forward hooks sum the time spent in each kind of module (all layers' q|k|v
  projections together, and so on) over those steps; hooks cost a little, so the sum runs a bit
  above the plain median;
- the long workload: `--workload` essay prompts (bench_peers.py's long prompts with the chat
  template), 32 at a time, each exactly 128 tokens, submitted as slots free up: total time and
  output tokens per second, split between steps with prompt chunks and pure decode steps.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time

from serving import use_the_checkout_in_process


class ModuleTimes:
    """Seconds spent in each kind of module (every layer's q|k|v projection together, and so on),
    from forward hooks on the model and its layers' modules."""

    def __init__(self, model) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._entered: dict[int, float] = {}
        for name, module in model.named_modules():
            if name in ("model", "lm_head") or name.startswith("model.layers."):
                kind = ".".join(part for part in name.split(".") if not part.isdigit())
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(functools.partial(self._leave, kind))

    def _enter(self, module, args) -> None:
        self._entered[id(module)] = time.perf_counter()

    def _leave(self, kind: str, module, args, output) -> None:
        self.seconds[kind] += time.perf_counter() - self._entered[id(module)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=100, help="prompt tokens of each decoding sequence")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--workload", type=int, default=64, help="long requests (0: none)")
    parser.add_argument("--quantization", default="none", choices=["none", "int8"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="MODEL_DTYPE")
    args = parser.parse_args()

    use_the_checkout_in_process()
    import torch

    from bench_peers import long_prompts
    from engine.core.block_manager import BlockManager, block_hashes
    from engine.core.model_runner import ModelRunner
    from engine.core.scheduler import Scheduler
    from engine.core.sequence import FinishReason, SamplingRequest, Sequence
    from engine.layers.kernels import cpu_description, read_cpuinfo
    from engine.models.catalog import BentoModelStoreCatalog
    from engine.models.devices import configure_torch
    from engine.models.loader import BatchingOptions, ModelLoader
    from engine.models.memory import MemoryLimits
    from metrics import SchedulerMetrics
    from settings import get_settings

    settings = get_settings()
    configure_torch(settings.cpu_threads, settings.gpu_memory_fraction)  # as the engine service does
    model_id = settings.default_model_id
    entry = BentoModelStoreCatalog().entries()[model_id]
    limits = MemoryLimits(max_usage_fraction=0.95, min_free_gb=0.5, gpu_memory_fraction=0.8)
    loader = ModelLoader(limits, args.dtype, args.quantization, BatchingOptions(kv_cache_bytes=2 << 30))
    loaded = loader.load(entry, "cpu")
    loaded.core.stop()  # this process drives the scheduler and runner itself
    model, cache = loaded.model, loaded.cache
    print(f"host: {cpu_description(read_cpuinfo())[0]}, {torch.get_num_threads()} threads; model {model_id}, "
          f"{args.dtype}, quantization {args.quantization}, {loaded.load_time_s:.1f} s to load")

    def engine(max_batch_size: int) -> tuple[Scheduler, ModelRunner]:
        blocks = BlockManager(cache.num_blocks)
        metrics = SchedulerMetrics.for_model(f"bench-step-{max_batch_size}")
        scheduler = Scheduler(blocks, set(), max_batch_size=max_batch_size, prefill_budget=512, max_queue_size=1024,
                              metrics=metrics)
        return scheduler, ModelRunner(model, cache, set())

    def submit(scheduler: Scheduler, prompt: list[int], new_tokens: int) -> None:
        request = SamplingRequest(prompt, new_tokens, 0.0, time.monotonic() + 3600, ignore_eos=True)
        scheduler.add(Sequence(request, lambda event: None, block_hashes(prompt)), time.monotonic())

    def step(scheduler: Scheduler, runner: ModelRunner):
        planned = scheduler.schedule(time.monotonic())
        started = time.perf_counter()
        output = runner.execute(planned)
        spent = time.perf_counter() - started
        scheduler.update(planned, output, time.monotonic())
        return planned, spent

    module_times = ModuleTimes(model) if args.breakdown else None

    token = 1000
    for rows in args.rows:
        scheduler, runner = engine(rows)
        for _ in range(rows):
            submit(scheduler, list(range(token, token + args.context)), args.steps + 10)
            token += args.context
        prefill_s = 0.0
        while True:
            planned, spent = step(scheduler, runner)
            if not planned.prefilling:
                break
            prefill_s += spent
        print(f"prefill, {rows} prompts of {args.context} tokens: {rows * args.context / prefill_s:.0f} tokens/s")
        for _ in range(3):
            step(scheduler, runner)
        if module_times:
            module_times.seconds.clear()
        times = [step(scheduler, runner)[1] for _ in range(args.steps)]
        print(f"decode step, {rows} rows of {args.context}+ tokens: median {statistics.median(times) * 1000:.1f} ms, "
              f"min {min(times) * 1000:.1f} ms over {args.steps} steps")
        for kind, seconds in sorted(module_times.seconds.items() if module_times else [], key=lambda item: -item[1]):
            print(f"  {kind}: {seconds / args.steps * 1000:.2f} ms a step")
        scheduler.finish_all(FinishReason.CANCELLED)  # frees the blocks for the next row count

    if args.workload:
        tokenizer = loaded.tokenizer
        prompts = [
            tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
            for messages in long_prompts(args.workload, seed=7)
        ]
        scheduler, runner = engine(32)
        pending = list(prompts)
        spent = {"with prompt chunks": [0, 0.0], "decode only": [0, 0.0]}
        started = time.perf_counter()
        while pending or scheduler.has_work:
            while pending and len(scheduler.running) + len(scheduler.waiting) < 32:
                submit(scheduler, pending.pop(0), 128)
            planned, seconds = step(scheduler, runner)
            kind = "with prompt chunks" if planned.prefilling else "decode only"
            spent[kind][0] += 1
            spent[kind][1] += seconds
        elapsed = time.perf_counter() - started
        print(f"long workload: {len(prompts)} requests of {statistics.mean(map(len, prompts)):.0f} prompt tokens, "
              f"128 tokens each, 32 at a time: {elapsed:.1f} s, {len(prompts) * 128 / elapsed:.0f} tok/s")
        for kind, (count, seconds) in spent.items():
            print(f"  {count} steps {kind}: {seconds:.1f} s ({seconds / max(count, 1) * 1000:.0f} ms a step)")


if __name__ == "__main__":
    main()
