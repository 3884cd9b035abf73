"""How many torch threads the engine's steps run on: CPU_THREADS, less the cores that other
processes keep busy.

A matrix product split over N threads waits for the slowest of them, at every barrier, and a decode
step has hundreds. When another process holds a core, the thread there runs part of the time and
the whole step waits on it: on a 2-core machine with a CPU hog on each core, two threads served a
burst at a sixth of their quiet rate, and single steps swung 20x with the scheduler, so that no
estimate of the queue's wait held; one thread served the same burst at 0.85x the quiet rate of two
(scripts/burst.py --hog 2, BENCHMARKS.md "Load shedding at the door"). So a sampler measures, every
half second, how many of this process's cores the other processes kept busy, and each step runs on
the cores left.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable

from metrics import STEP_THREADS

logger = logging.getLogger(__name__)

SAMPLE_S = 0.5
# Others' load costs a thread from this much of a core: the slivers left over (the API workers'
# validation, a shell) are not worth one, a hog's whole core is.
BUSY_CORE = 0.75
# A thread given up comes back only once others' load is this much lower again, so a load that hovers
# about the line does not switch the count (and log it) at every sample.
HYSTERESIS_CORES = 0.25

CpuTimes = tuple[float, float]  # (busy, total) CPU-seconds


def read_cpu_times(cpus: frozenset[int], stat_path: str = "/proc/stat") -> CpuTimes | None:
    """(busy, total) seconds summed over `cpus` since boot, from the kernel's per-CPU counters; None
    where there are none (not Linux). Time the hypervisor stole counts as busy: another guest had it."""
    try:
        with open(stat_path) as stat:
            lines = stat.readlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        times = [int(field) for field in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(times)
        busy += sum(times) - times[3] - times[4]
    ticks = os.sysconf("SC_CLK_TCK")
    return (busy / ticks, total / ticks) if total else None


class OthersLoad:
    """The cores of `cpus` that other processes kept busy between two samples: all the busy time
    on them, less this process's own CPU time."""

    def __init__(
        self,
        cpus: frozenset[int],
        cpu_times: Callable[[], CpuTimes | None] | None = None,
        own_cpu_s: Callable[[], float] = time.process_time,
    ) -> None:
        self._cpus = len(cpus)
        self._cpu_times = cpu_times or (lambda: read_cpu_times(cpus))
        self._own_cpu_s = own_cpu_s
        self._last = (self._cpu_times(), self._own_cpu_s())
        self.cores = 0.0

    def sample(self) -> float:
        """Others' busy cores since the previous sample; the last figure while the counters have not moved."""
        (before, own_before), (now, own_now) = self._last, (self._cpu_times(), self._own_cpu_s())
        if before is not None and now is not None and now[1] > before[1]:
            others_s = max(0.0, (now[0] - before[0]) - (own_now - own_before))
            self.cores = min(self._cpus, others_s * self._cpus / (now[1] - before[1]))
            self._last = (now, own_now)
        return self.cores


def threads_left(most: int, cpus: int, others_cores: float) -> int:
    """Threads for a step: one per core that others leave, at most `most`, at least one."""
    taken = math.floor(others_cores + (1 - BUSY_CORE))
    return max(1, min(most, cpus - taken))


class StepThreads:
    """The thread count the next step runs on (`threads`), kept by a daemon thread that samples
    OthersLoad every SAMPLE_S. Each thread that runs steps applies it before its step (`apply`):
    OpenMP's thread count is per calling thread."""

    def __init__(self, most: int, cpus: frozenset[int], load: OthersLoad | None = None) -> None:
        self.most, self._cpus = most, len(cpus)
        self._load = load or OthersLoad(cpus)
        self.threads = most
        self._applied = threading.local()

    @classmethod
    def started(cls, most: int) -> StepThreads:
        cpus = frozenset(os.sched_getaffinity(0))
        step_threads = cls(most, cpus)
        threading.Thread(target=step_threads._sample_forever, name="step-threads", daemon=True).start()
        return step_threads

    def sample(self) -> int:
        others = self._load.sample()
        threads = threads_left(self.most, self._cpus, others)
        if threads > self.threads:
            threads = max(self.threads, threads_left(self.most, self._cpus, others + HYSTERESIS_CORES))
        if threads != self.threads:
            logger.info(
                "steps run on %d of CPU_THREADS=%d threads: other processes keep %.1f of %d cores busy",
                threads, self.most, others, self._cpus,
            )  # fmt: skip
            self.threads = threads
        STEP_THREADS.set(threads)
        return threads

    def _sample_forever(self) -> None:
        while True:
            time.sleep(SAMPLE_S)
            self.sample()

    def apply(self, set_threads: Callable[[int], None]) -> int:
        """Sets this thread's count to `threads` where it is not that yet; returns it."""
        threads = self.threads
        if getattr(self._applied, "threads", None) != threads:
            set_threads(threads)
            self._applied.threads = threads
        return threads
