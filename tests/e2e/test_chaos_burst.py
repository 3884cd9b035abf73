"""Chaos: a burst of 200 concurrent /generate calls at the service's defaults, on a quiet machine and
on one a CPU hog keeps busy on every core (scripts/burst.py starts and stops it). Every answer is 200
or 429, never a 504: what cannot finish within its deadline is refused at the door. Bounds: every
answer within MAX_GENERATION_TIME (30 s, and 5 s for its way to and from the engine); every refusal within REFUSAL_BOUND_MS, a bound on waiting
(a refusal never waits on the queue), not on speed: scripts/burst.py measures the latency against
its 100 ms bar (BENCHMARKS.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT

from .server import start

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

REFUSAL_BOUND_MS = 2000
# MAX_GENERATION_TIME's 30 s run from the request's arrival in the engine; the client also waits for
# the hop there and for the answer's way back.
ANSWER_BOUND_S = 35


def burst(url: str, hogs: int) -> tuple[bool, str]:
    """The verdict of one burst, and what scripts/burst.py printed."""
    run = subprocess.run(
        [sys.executable, "scripts/burst.py", "--url", url, "--rounds", "1", "--hog", str(hogs),
         "--refusal-ms", str(REFUSAL_BOUND_MS), "--deadline-s", str(ANSWER_BOUND_S)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return run.returncode == 0 and "verdict: PASS" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def refusals(report: str) -> int:
    return sum(int(count) for count in re.findall(r"429: (\d+)\}", report))


def shed_requests(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(value) for value in re.findall(r'^ai_model_shed_requests_total\{model="[^"]+"\} (\S+)$', metrics, re.M))


def test_a_burst_on_a_quiet_then_a_busy_machine_gets_only_answers_in_time_and_quick_refusals(tmp_path):
    service = start(tmp_path / "burst.log")  # every setting at its default
    try:
        quiet_passed, quiet = burst(service.url, hogs=0)
        busy_passed, busy = burst(service.url, hogs=len(os.sched_getaffinity(0)))
        shed = shed_requests(service.url)
    finally:
        service.stop()
    report = f"quiet machine:\n{quiet}\nbusy machine:\n{busy}\nengine log:\n{engine_lines(service.logs())}"
    print(report)
    assert quiet_passed and busy_passed, report
    assert shed == refusals(quiet) + refusals(busy), "every 429 is a request shed by its expected finish"


def engine_lines(log: str) -> str:
    """What the engine logged of its loads and steps' threads: the figures a failure is read by."""
    return "\n".join(line for line in log.splitlines() if "generation-engine" in line)[-3000:]
