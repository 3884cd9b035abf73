"""What the batch scheduler's metric updates cost per step, in prometheus_client's multiprocess mode
(one mmap write per value, as under `bentoml serve`). Prints microseconds per step.

    .venv/bin/python scripts/bench_metrics.py --steps 1000 --batch 32 --turnover 4

Each step makes the updates the scheduler (`engine/core/scheduler.py`) makes: the occupancy gauges, the step histogram,
a timestamp per row, and for `--turnover` sequences joining and as many leaving, their queue wait,
prompt tokens, first token, generated tokens and time per token. Rounds with and without the
updates alternate, so machine drift falls on both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def steps_with_metrics(metrics, rows: list[list[float]], steps: int, turnover: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        now = time.monotonic()
        metrics.occupancy(0, len(rows))
        for _ in range(turnover):
            metrics.queue_wait.observe(0.004)
            metrics.prompt_tokens.inc(70)
        metrics.step_sequences.observe(len(rows))
        now = time.monotonic()
        for row in rows:
            row[0] = now
        for _ in range(turnover):
            metrics.time_to_first_token.observe(0.08)
            metrics.generated_tokens.inc(8)
            metrics.time_per_output_token.observe(0.03)
    return time.perf_counter() - started


def steps_without_metrics(rows: list[list[float]], steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        now = time.monotonic()
        now = time.monotonic()
        for row in rows:
            row[0] = now
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--turnover", type=int, default=4, help="sequences joining, and leaving, per step")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # before prometheus_client is imported
        from metrics import SchedulerMetrics

        metrics = SchedulerMetrics.for_model("bench-model")
        rows = [[0.0] for _ in range(args.batch)]
        with_metrics, without = [], []
        for _ in range(args.rounds):
            with_metrics.append(steps_with_metrics(metrics, rows, args.steps, args.turnover))
            without.append(steps_without_metrics(rows, args.steps))
        files = sorted(path.name for path in Path(directory).iterdir())

    cost_us = (statistics.median(with_metrics) - statistics.median(without)) / args.steps * 1e6
    print(f"multiprocess files written: {', '.join(files)}")
    print(
        f"{args.steps} steps, batch {args.batch}, {args.turnover} joining and {args.turnover} leaving per step, "
        f"median of {args.rounds} rounds: {statistics.median(with_metrics) * 1e3:.2f} ms with the metric updates, "
        f"{statistics.median(without) * 1e3:.2f} ms without"
    )
    print(f"the metric updates cost {cost_us:.1f} us per step")


if __name__ == "__main__":
    main()
