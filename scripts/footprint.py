"""The load guard's footprint estimate against the memory a load really takes.

Each case loads a store model in a fresh process with the engine's own loader, as the engine does
(weights, fused layers, int8, the linear kernels' plans and weight copies, the KV cache, the engine
core), and prints what the loader's memory checks count (the guard's `ModelLoader.footprint`, and
the linear kernels' weight copies it admits once the weights are in) beside the peak resident memory
the load added (ru_maxrss less the RSS before it) with the KV cache filled, as serving fills it (its
pages are not resident until written), and what stays.

    python scripts/footprint.py [--model smollm2-135m-instruct] [--quantization none int8] [--kv-cache-mb 1024]
    python scripts/footprint.py --model qwen-model_full      # scripts/full_size.py imports it
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource

import psutil

from serving import use_the_checkout_in_process

MIB = 2**20


def measure(model_id: str, quantization: str, kv_cache_mb: int) -> dict[str, float]:
    use_the_checkout_in_process()
    from engine.core.sequence import FinishReason
    from engine.models.catalog import BentoModelStoreCatalog
    from engine.models.loader import BatchingOptions, ModelLoader
    from engine.models.memory import MemoryLimits

    process = psutil.Process()
    loader = ModelLoader(
        MemoryLimits(max_usage_fraction=0.99, min_free_gb=0.0, gpu_memory_fraction=0.8),
        "auto",
        quantization,
        BatchingOptions(kv_cache_bytes=kv_cache_mb * MIB),
    )
    entry = BentoModelStoreCatalog().get(model_id)
    estimate = loader.footprint(entry, "cpu")
    before = process.memory_info().rss
    loaded = loader.load(entry, "cpu")
    for layer in loaded.cache.keys + loaded.cache.values:
        layer.fill_(1.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    settled = process.memory_info().rss
    loaded.core.stop(FinishReason.UNLOADED)
    return {
        "estimate_mb": (estimate + (loaded.linear_kernels.copies_bytes if loaded.linear_kernels else 0)) / MIB,
        "peak_mb": (peak - before) / MIB,
        "settled_mb": (settled - before) / MIB,
        "reported_mb": loaded.memory_bytes / MIB + loaded.cache.size_bytes / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantization", nargs="+", default=["none", "int8"])
    parser.add_argument("--kv-cache-mb", type=int, default=1024)
    args = parser.parse_args()
    print(f"model {args.model}, KV_CACHE_MB={args.kv_cache_mb}; memory the load added to the process, in MiB")
    print("| quantization | estimate | peak | settled | weights + copies + KV | estimate / peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    context = multiprocessing.get_context("spawn")  # a fresh process per case: ru_maxrss is the process's
    for quantization in args.quantization:
        with context.Pool(1) as pool:
            found = pool.apply(measure, (args.model, quantization, args.kv_cache_mb))
        ratio = found["estimate_mb"] / found["peak_mb"]
        print(
            f"| {quantization} | {found['estimate_mb']:.0f} | {found['peak_mb']:.0f} | {found['settled_mb']:.0f} "
            f"| {found['reported_mb']:.0f} | {ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
