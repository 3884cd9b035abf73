"""Why batched decoding costs what it does on a CPU: one decoder layer stack's matrix products at
a few rows (the decode batch), with the kernels torch offers for fp32 linear layers and ours
(engine/layers/tuned_linear.py times these and more per shape at load).

    python scripts/bench_matmul.py            # SmolLM2-135M's 30 layers of shapes, 2 threads

Prints milliseconds per pass over all 210 weight matrices (424 MB, so out of cache, as in a model),
then over the lm_head (the 49152 x 576 tied embedding, 113 MB). On a CPU with AVX-512 the
engine's packed-panel kernel is timed too, on the fused decoder's shapes (q|k|v, gate|up). F.linear and the small-row kernel
are timed alternately in the same loop, so their ratio holds even while the machine's speed drifts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
import torch.utils.mkldnn

from engine.layers.kernels import cpu_description, load_kernels, read_cpuinfo

LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
FUSED_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # q|k|v and gate|up in one matrix each
LM_HEAD_SHAPE = (49152, 576)


def timed(work, repeats: int = 5) -> float:
    work()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats * 1000


def timed_alternately(first, second, repeats: int = 9) -> tuple[float, float]:
    """Median ms of each, run in turns so both see the same machine speed."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for work, spent in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            work()
            spent.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = load_kernels()
    if kernel is None:
        raise SystemExit("the small-row kernel could not be built here (see the warning above)")
    weights = [torch.randn(out, into) for _ in range(30) for out, into in LAYER_SHAPES]
    fused = [torch.randn(out, into) for _ in range(30) for out, into in FUSED_SHAPES]
    onednn = []
    for weight in weights:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight.data = weight
        onednn.append(torch.utils.mkldnn.to_mkldnn(torch.nn.Sequential(layer))[0])
    lm_head = torch.randn(*LM_HEAD_SHAPE)
    avx512 = "avx512f" in cpu_description(read_cpuinfo())[1]
    panels = [kernel.pack_linear_weight(weight) for weight in fused] if avx512 else []
    lm_head_panels = kernel.pack_linear_weight(lm_head) if avx512 else None
    print(f"{args.threads} threads; ms per pass over 30 layers, then over the lm_head")
    print("| rows | F.linear | fused q/k/v, gate/up | oneDNN linear | MKL packed | small-row kernel (vs F.linear) "
          "| AVX-512 packed, fused shapes (vs F.linear fused) | lm_head F.linear | lm_head kernel (vs F.linear) "
          "| lm_head AVX-512 packed (vs F.linear) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rows in args.rows:
        inputs = {576: torch.randn(rows, 576), 1536: torch.randn(rows, 1536)}
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(weight, rows) for weight in weights]
        linear, small = timed_alternately(
            lambda: [F.linear(inputs[w.shape[1]], w) for w in weights],
            lambda: [kernel.small_linear(inputs[w.shape[1]], w) for w in weights],
        )
        head, small_head = timed_alternately(
            lambda: F.linear(inputs[576], lm_head), lambda: kernel.small_linear(inputs[576], lm_head)
        )
        fusion = timed(lambda: [F.linear(inputs[w.shape[1]], w) for w in fused])
        dnn = timed(lambda: [layer(inputs[w.shape[1]]) for w, layer in zip(weights, onednn)])
        mkl = timed(lambda: [torch.ops.mkl._mkl_linear(inputs[w.shape[1]], p, w, None, rows) for w, p in zip(weights, packed)])
        if avx512:
            on_panels = timed(lambda: [kernel.packed_linear(inputs[w.shape[1]], p, None, w.shape[0]) for w, p in zip(fused, panels)])
            head_panels = timed(lambda: kernel.packed_linear(inputs[576], lm_head_panels, None, LM_HEAD_SHAPE[0]))
            packed_cells = f"{on_panels:.1f} ({on_panels / fusion:.2f}) | {head:.1f} | {small_head:.1f} ({small_head / head:.2f}) | {head_panels:.1f} ({head_panels / head:.2f})"
        else:
            packed_cells = f"- | {head:.1f} | {small_head:.1f} ({small_head / head:.2f}) | -"
        print(f"| {rows} | {linear:.1f} | {fusion:.1f} | {dnn:.1f} | {mkl:.1f} | {small:.1f} ({small / linear:.2f}) | {packed_cells} |")


if __name__ == "__main__":
    main()
