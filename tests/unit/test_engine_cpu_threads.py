"""The engine's step thread count: CPU_THREADS less the cores other processes keep busy (engine/models/cpu_threads.py)."""

from __future__ import annotations

import threading

import pytest

from engine.models.cpu_threads import OthersLoad, StepThreads, read_cpu_times, threads_left

STAT = """cpu  400 0 100 1500 0 0 0 0 0 0
cpu0 200 0 50 750 0 0 0 0 0 0
cpu1 200 0 50 700 50 0 0 0 0 0
cpu2 9999 0 0 0 0 0 0 0 0 0
intr 12345
"""


def test_the_counters_of_this_process_cpus_are_summed_and_waiting_on_io_is_idle(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    monkeypatch.setattr("os.sysconf", lambda name: 100)
    busy, total = read_cpu_times(frozenset({0, 1}), str(stat))
    assert (busy, total) == (5.0, 20.0)  # cpu2 is not ours; the summary line is not a CPU


def test_no_counters_is_no_figure(tmp_path):
    assert read_cpu_times(frozenset({0}), str(tmp_path / "absent")) is None


class Counters:
    """/proc/stat and this process's CPU time, moved by hand."""

    def __init__(self) -> None:
        self.busy = self.total = self.own = 0.0

    def run(self, seconds: float, cpus: int, others_cores: float, own_cores: float) -> None:
        self.total += seconds * cpus
        self.busy += seconds * (others_cores + own_cores)
        self.own += seconds * own_cores


@pytest.fixture
def counters() -> Counters:
    return Counters()


def load_on_two_cores(counters: Counters) -> OthersLoad:
    return OthersLoad(frozenset({0, 1}), lambda: (counters.busy, counters.total), lambda: counters.own)


def test_others_load_is_the_busy_time_less_this_process_own(counters):
    load = load_on_two_cores(counters)
    counters.run(0.5, cpus=2, others_cores=1.0, own_cores=1.0)
    assert load.sample() == pytest.approx(1.0)
    counters.run(0.5, cpus=2, others_cores=0.0, own_cores=2.0)
    assert load.sample() == pytest.approx(0.0)


def test_counters_that_have_not_moved_keep_the_last_figure(counters):
    load = load_on_two_cores(counters)
    counters.run(0.5, cpus=2, others_cores=2.0, own_cores=0.0)
    assert load.sample() == pytest.approx(2.0)
    assert load.sample() == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("others_cores", "threads"),
    [(0.0, 2), (0.2, 2), (0.74, 2), (0.8, 1), (1.0, 1), (2.0, 1)],
)
def test_a_step_runs_on_the_cores_others_leave(others_cores, threads):
    assert threads_left(most=2, cpus=2, others_cores=others_cores) == threads


def test_never_more_than_configured_nor_fewer_than_one():
    assert threads_left(most=4, cpus=16, others_cores=0.0) == 4
    assert threads_left(most=4, cpus=16, others_cores=13.0) == 3
    assert threads_left(most=4, cpus=4, others_cores=8.0) == 1


def test_steps_follow_a_hog_that_comes_and_goes(counters):
    step_threads = StepThreads(2, frozenset({0, 1}), load_on_two_cores(counters))
    counters.run(0.5, cpus=2, others_cores=0.0, own_cores=2.0)
    assert step_threads.sample() == 2
    counters.run(0.5, cpus=2, others_cores=1.0, own_cores=1.0)  # a hog took a core from two threads
    assert step_threads.sample() == 1
    counters.run(0.5, cpus=2, others_cores=1.0, own_cores=1.0)  # one thread keeps the other core
    assert step_threads.sample() == 1
    counters.run(0.5, cpus=2, others_cores=0.0, own_cores=1.0)  # the hog left: a core idles
    assert step_threads.sample() == 2


def test_each_stepping_thread_sets_its_own_count_once_per_change(counters):
    step_threads = StepThreads(2, frozenset({0, 1}), load_on_two_cores(counters))
    calls: list[tuple[str, int]] = []

    def record(threads: int) -> None:
        calls.append((threading.current_thread().name, threads))

    step_threads.apply(record)
    step_threads.apply(record)
    other = threading.Thread(target=step_threads.apply, args=(record,), name="other")
    other.start()
    other.join()
    counters.run(0.5, cpus=2, others_cores=2.0, own_cores=0.0)
    step_threads.sample()
    step_threads.apply(record)
    main = threading.current_thread().name
    assert calls == [(main, 2), ("other", 2), (main, 1)]


def test_a_load_that_hovers_about_the_line_does_not_switch_the_count_at_every_sample(counters):
    step_threads = StepThreads(2, frozenset({0, 1}), load_on_two_cores(counters))
    counters.run(0.5, cpus=2, others_cores=0.8, own_cores=1.0)
    assert step_threads.sample() == 1
    for others_cores in (0.7, 0.6, 0.74, 0.55):  # below the line, not by the margin
        counters.run(0.5, cpus=2, others_cores=others_cores, own_cores=1.0)
        assert step_threads.sample() == 1
    counters.run(0.5, cpus=2, others_cores=0.4, own_cores=1.0)
    assert step_threads.sample() == 2
