"""The queue board: the engine publishes its rate and backlog, API workers refuse by it before the
hop, and work on its way is counted once, by a ticket or by the scheduler."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from engine.core import service_rate
from engine.core.engine_core import EngineCore
from engine.core.queue_board import BOARD_NAME, NO_TICKET, TICKET_TTL_S, QueueBoard, remove_abandoned_boards
from engine.core.scheduler import QueueFull
from engine.core.sequence import SamplingRequest
from engine.core.service_rate import PastDeadline, Work
from tests.unit.fakes import ScriptedRunner
from tests.unit.test_engine_scheduler import prompt_of, scheduler, submit
from tests.unit.test_engine_service_rate import DECODE_STEP_S, PROMPT_TOKEN_S, taught

MODEL = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def whole_deadline(monkeypatch):
    """The estimates here are checked against the whole deadline; the planned share has its own test."""
    monkeypatch.setattr(service_rate, "PLANNED_SHARE_OF_DEADLINE", 1.0)


@pytest.fixture
def board_file(tmp_path):
    return tmp_path / "queues.board"


@pytest.fixture
def engine_board(board_file):
    board = QueueBoard(board_file)
    yield board
    board.close()


@pytest.fixture
def worker_boards(board_file):
    """Two API workers' views of the same board: separate processes map the file each."""
    boards = [QueueBoard(board_file), QueueBoard(board_file)]
    yield boards
    for board in boards:
        board.close()


def busy_scheduler(batch_size: int = 2, running_steps: int = 100):
    """A measured scheduler with a full batch of `running_steps`-step sequences."""
    into = scheduler(max_batch_size=batch_size)
    taught(into.rate)
    for offset in range(batch_size):
        submit(into, prompt_of(40, 1000 * (offset + 1)), max_new_tokens=running_steps)
    return into


def test_a_model_not_on_the_board_is_let_through_unchecked(worker_boards):
    assert worker_boards[0].reserve(MODEL, Work(30, 10), priority=0, allowed_s=0.001) == NO_TICKET


def test_until_the_rate_is_measured_requests_get_tickets_and_none_is_refused(engine_board, worker_boards):
    engine_board.publish(MODEL, scheduler(max_batch_size=1))
    tickets = [worker_boards[0].reserve(MODEL, Work(30, 100), priority=0, allowed_s=1.0) for _ in range(5)]
    assert NO_TICKET not in tickets and len(set(tickets)) == 5


def test_a_request_the_published_backlog_would_push_past_its_deadline_is_refused(engine_board, worker_boards):
    engine_board.publish(MODEL, busy_scheduler())
    # Both slots are held for 100 steps, after their two prompts of 40: 10 more steps end at 5.58 s.
    with pytest.raises(PastDeadline) as late:
        worker_boards[0].reserve(MODEL, Work(0, 10), priority=0, allowed_s=5.0)
    assert late.value.expected_s == pytest.approx(80 * PROMPT_TOKEN_S + 110 * DECODE_STEP_S)
    assert worker_boards[1].reserve(MODEL, Work(0, 10), priority=0, allowed_s=6.0) != NO_TICKET


def test_tickets_on_their_way_count_for_every_worker_until_the_engine_admits_them(engine_board, worker_boards):
    """Batch of one: each request admitted holds the slot for its 20 steps (1 s)."""
    into = scheduler(max_batch_size=1)
    taught(into.rate)
    engine_board.publish(MODEL, into)
    first, second = worker_boards
    on_the_way = [first.reserve(MODEL, Work(0, 20), 0, 3.5), second.reserve(MODEL, Work(0, 20), 0, 3.5)]
    third = first.reserve(MODEL, Work(0, 20), 0, 3.5)  # finishes at 3 s
    with pytest.raises(PastDeadline):
        second.reserve(MODEL, Work(0, 20), 0, 3.5)  # would finish at 4 s
    # The engine admits the first: its work moves from the ticket into the backlog it publishes.
    submit(into, prompt_of(8), max_new_tokens=20)
    engine_board.publish(MODEL, into, admitted_ticket=on_the_way[0])
    with pytest.raises(PastDeadline):
        second.reserve(MODEL, Work(0, 20), 0, 3.5)
    # A request that ends without reaching the engine (a cached answer) gives its place back.
    first.release(third)
    assert second.reserve(MODEL, Work(0, 20), 0, 3.5) != NO_TICKET


def test_an_engine_core_clears_the_ticket_as_it_admits_or_refuses_the_request(engine_board, worker_boards):
    into = busy_scheduler(batch_size=1, running_steps=40)
    core = EngineCore(into, ScriptedRunner({}), name=MODEL, board=engine_board)
    core._publish()
    worker = worker_boards[0]
    admitted = worker.reserve(MODEL, Work(0, 10), 0, 10.0)
    core.submit(SamplingRequest(prompt_of(8, 7000), 10, 0.0, time.monotonic() + 10, ticket=admitted), lambda event: None)
    refused = worker.reserve(MODEL, Work(0, 10), 0, 10.0)
    with pytest.raises(PastDeadline):  # the engine's own check: 40 + 10 + 10 steps > 2.9 s
        core.submit(SamplingRequest(prompt_of(8, 8000), 10, 0.0, time.monotonic() + 2.9, ticket=refused), lambda event: None)
    tickets = engine_board._tickets
    assert not (tickets["serial"] != NO_TICKET).any()
    # The backlog now holds the admitted request: 40 + 10 steps ahead, 10 of its own = 3 s.
    with pytest.raises(PastDeadline):
        worker.reserve(MODEL, Work(0, 10), 0, 2.9)
    worker.reserve(MODEL, Work(0, 10), 0, 3.1)


def test_a_ticket_whose_worker_died_on_the_way_is_ignored_after_its_time(engine_board, worker_boards, monkeypatch):
    into = scheduler(max_batch_size=1)
    taught(into.rate)
    engine_board.publish(MODEL, into)
    worker_boards[0].reserve(MODEL, Work(0, 60), 0, 10.0)  # never released
    with pytest.raises(PastDeadline):
        worker_boards[1].reserve(MODEL, Work(0, 10), 0, 3.4)
    later = time.monotonic() + TICKET_TTL_S + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert worker_boards[1].reserve(MODEL, Work(0, 10), 0, 3.4) != NO_TICKET


def test_an_urgent_request_is_left_to_the_engine_and_a_background_one_sees_all_the_queue(engine_board, worker_boards):
    into = busy_scheduler(batch_size=1, running_steps=20)
    for offset in range(3):  # background work waiting: 3 x 40 steps
        submit(into, prompt_of(8, 5000 + 100 * offset), max_new_tokens=40, priority=10)
    engine_board.publish(MODEL, into)
    worker = worker_boards[0]
    assert worker.reserve(MODEL, Work(0, 10), priority=-10, allowed_s=0.1) != NO_TICKET  # the engine decides
    # The urgent one on its way is ahead (its 10 steps), the background work is not: 40 steps, 2.04 s.
    worker.reserve(MODEL, Work(0, 10), priority=0, allowed_s=2.1)
    with pytest.raises(PastDeadline):
        worker.reserve(MODEL, Work(0, 10), priority=10, allowed_s=2.1)


def test_an_unloaded_model_leaves_the_board_and_a_restarted_engine_clears_it(engine_board, worker_boards):
    engine_board.publish(MODEL, busy_scheduler())
    engine_board.withdraw(MODEL)
    assert worker_boards[0].reserve(MODEL, Work(0, 10), 0, 0.001) == NO_TICKET
    engine_board.publish(MODEL, busy_scheduler())
    engine_board.clear()
    assert worker_boards[0].reserve(MODEL, Work(0, 10), 0, 0.001) == NO_TICKET


def test_reservations_from_threads_and_workers_at_once_get_distinct_tickets(engine_board, worker_boards):
    engine_board.publish(MODEL, scheduler(max_queue_size=1024))
    tickets: list[int] = []

    def reserve_many(board: QueueBoard) -> None:
        for _ in range(200):
            tickets.append(board.reserve(MODEL, Work(10, 1), 0, 30.0))

    threads = [threading.Thread(target=reserve_many, args=(board,)) for board in (*worker_boards, worker_boards[0])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(tickets)) == 600 and NO_TICKET not in tickets


def test_an_engine_core_that_goes_idle_after_its_callers_left_publishes_an_empty_backlog(engine_board, worker_boards):
    """Otherwise the board would go on refusing every request for work nobody waits for, and with
    nothing let through, nothing would ever publish again."""
    into = scheduler(max_batch_size=1)
    taught(into.rate)
    core = EngineCore(into, ScriptedRunner({}), name=MODEL, board=engine_board)
    sequences = [
        core.submit(SamplingRequest(prompt_of(8, 1000 * n), 50, 0.0, time.monotonic() + 60), lambda event: None)
        for n in range(1, 4)
    ]
    core._publish()
    with pytest.raises(PastDeadline):
        worker_boards[0].reserve(MODEL, Work(0, 10), 0, 3.0)  # 150 steps ahead
    for sequence in sequences:
        sequence.cancel()
    core.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                worker_boards[0].reserve(MODEL, Work(0, 10), 0, 3.0)
                break
            except PastDeadline:
                time.sleep(0.01)
        else:
            pytest.fail("the board still shows the cancelled sequences ahead")
    finally:
        core.stop()


def test_the_queue_cap_counts_requests_on_their_way_and_refuses_at_the_door(engine_board, worker_boards):
    """Batch of two, queue of three: five requests fit from an empty engine, the sixth is refused
    before its hop, as Scheduler.add would refuse it after."""
    into = scheduler(max_batch_size=2, max_queue_size=3)
    engine_board.publish(MODEL, into)
    tickets = [worker_boards[index % 2].reserve(MODEL, Work(5, 1), priority=0, allowed_s=60.0) for index in range(5)]
    assert NO_TICKET not in tickets
    with pytest.raises(QueueFull) as full:
        worker_boards[0].reserve(MODEL, Work(5, 1), priority=0, allowed_s=60.0)
    assert (full.value.waiting, full.value.max_queue_size) == (3, 3)
    worker_boards[1].release(tickets[0])  # a request that ended on its way makes room
    assert worker_boards[0].reserve(MODEL, Work(5, 1), priority=0, allowed_s=60.0) != NO_TICKET


def test_a_full_queue_lets_a_more_urgent_request_through_to_take_a_less_urgent_place(engine_board, worker_boards):
    into = scheduler(max_batch_size=1, max_queue_size=2)
    for offset in range(2):
        submit(into, prompt_of(5, 1000 * (offset + 1)), max_new_tokens=1, priority=50)
    engine_board.publish(MODEL, into)
    assert worker_boards[0].reserve(MODEL, Work(5, 1), priority=50, allowed_s=60.0) != NO_TICKET  # the free slot
    with pytest.raises(QueueFull):
        worker_boards[1].reserve(MODEL, Work(5, 1), priority=50, allowed_s=60.0)
    assert worker_boards[1].reserve(MODEL, Work(5, 1), priority=0, allowed_s=60.0) != NO_TICKET


def test_a_starting_engine_removes_the_boards_of_servers_that_are_gone(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    abandoned = tmp_path / BOARD_NAME.format(pid=gone.pid)
    live = tmp_path / BOARD_NAME.format(pid=os.getpid())
    other = tmp_path / "unrelated.board"
    for path in (abandoned, live, other):
        path.write_bytes(b"")
    assert remove_abandoned_boards(tmp_path) == [abandoned]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_admissions_counted_one_by_one_agree_with_a_full_publish(engine_board, worker_boards):
    """A burst's admissions update the board a heap step each; the next step's publish replays the
    queue. Both must put a new request behind the same work."""
    into = busy_scheduler(batch_size=2, running_steps=40)
    core = EngineCore(into, ScriptedRunner({}), name=MODEL, board=engine_board)
    core._publish()
    worker = worker_boards[0]
    for offset in range(5):
        ticket = worker.reserve(MODEL, Work(8, 10), 0, 60.0)
        request = SamplingRequest(prompt_of(8, 7000 + 100 * offset), 10, 0.0, time.monotonic() + 60, ticket=ticket)
        core.submit(request, lambda event: None)
    assert not (engine_board._tickets["serial"] != NO_TICKET).any()
    worker.release(worker.reserve(MODEL, Work(8, 10), 0, 60.0))  # a recount from what the engine admitted

    def expected_s() -> float:
        with pytest.raises(PastDeadline) as late:
            worker.reserve(MODEL, Work(8, 10), 0, 1.0)  # alone it would finish in time
        return late.value.expected_s

    one_by_one = expected_s()
    core._publish()
    assert one_by_one == pytest.approx(expected_s())
