"""The engine process yields the CPU to the API workers: every thread, including torch's, runs at lower priority."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import json, os, threading, torch
torch.set_num_threads(2)
torch.ones(512, 512) @ torch.ones(512, 512)  # torch's worker threads exist before the call
from engine.models.devices import ENGINE_NICENESS, yield_cpu_to_api_workers
yield_cpu_to_api_workers()
started_later = []
worker = threading.Thread(target=lambda: started_later.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
worker.start(); worker.join()
def niceness_of(task):
    try:
        return os.getpriority(os.PRIO_PROCESS, int(task))
    except ProcessLookupError:  # the joined worker can linger in /proc a moment after it ended
        return None
niceness = [n for n in map(niceness_of, os.listdir("/proc/self/task")) if n is not None]
print(json.dumps({"expected": ENGINE_NICENESS, "threads": niceness, "started_later": started_later}))
"""


def test_every_engine_thread_and_every_later_one_runs_at_the_engine_niceness():
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert len(found["threads"]) > 1
    assert set(found["threads"]) == {found["expected"]}
    assert found["started_later"] == [found["expected"]]
