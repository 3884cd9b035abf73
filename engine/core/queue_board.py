"""The engine's queues as the API workers see them: a board in shared memory, so that a request the
queue would push past its deadline is refused in the API worker at once, before the hop to the
engine and its tokenizer, which a busy machine slows the most. (Scheduler.add decides again, exactly,
for the requests let through.)

One board per `bentoml serve`: a file named by the process that started the workers. The engine
core of each loaded model publishes its service rate and the replay of its admitted work
(service_rate.Backlog) after each step, and adds each sequence it admits. An API worker that lets a
request through reserves the request's estimated work with a ticket, which travels with the request;
the engine core clears the ticket as the sequence joins its queue (or is refused), in the same
update that adds it, so work on its way is counted once, by one of the two. A worker clears its
tickets as its requests end (an engine that never got them); a ticket older than TICKET_TTL_S is
dropped (its worker died on the way).

The board keeps, per model and view, the backlog the engine published and the same with the
tickets on their way, so a reservation costs a heap update, not a replay of the queue.

The backlog is kept in two views: the work ahead of a request of normal priority (running sequences,
and waiting ones of normal priority or more urgent), and the work ahead of the least urgent one (all
of it). A more urgent request is not checked here: only the engine sees what is less urgent than it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .scheduler import QueueFull
from .sequence import DEFAULT_PRIORITY
from .service_rate import Backlog, ServiceRate, Work, check_deadline

if TYPE_CHECKING:
    from .scheduler import Scheduler

MAX_PRIORITY = 100  # domain.generation.MAX_PRIORITY: the least urgent request
VIEWS = (DEFAULT_PRIORITY, MAX_PRIORITY)  # a view counts the waiting work of its priority or more urgent
MAX_MODELS = 8  # loaded at once; a model past them is simply not checked before the hop
MAX_SLOTS = 1024  # settings' bound on MAX_BATCH_SIZE
MAX_TICKETS = 1024  # requests on their way at once; past them, a request goes untracked
TICKET_TTL_S = 60.0  # a hop takes seconds at most; a ticket older than this lost its worker
NO_TICKET = 0
# The ticket an API worker reserved for the request it is handling, at its door (api/validation.py):
# its engine call carries that one instead of reserving again.
door_ticket: ContextVar[int] = ContextVar("door_ticket", default=NO_TICKET)

HEADER = np.dtype([("next_serial", "u8")])
BACKLOGS = np.dtype([("prompt_tokens", "u8", (len(VIEWS),)), ("slots", "u4", (len(VIEWS), MAX_SLOTS))])
MODEL = np.dtype(
    [
        ("name", "S64"),
        ("prompt_token_s", "f8"),  # 0: not measured yet
        ("decode_step_s", "f8"),
        ("row_cost", "f8"),
        ("batch_size", "u4"),
        ("running", "u4"),  # sequences in the batch
        ("waiting", "u4"),  # sequences queued for it
        ("max_queue_size", "u4"),
        ("least_urgent", "i4"),  # the priority of the queue's last sequence; -1: none waits
        ("admitted", BACKLOGS),  # each view's backlog as the engine published it
        ("ahead", BACKLOGS),  # the same with the tickets on their way: what a new request is behind
    ]
)
TICKET = np.dtype(
    [
        ("serial", "u8"),  # NO_TICKET: free
        ("created", "f8"),  # time.monotonic(), which every process of the machine shares
        ("model", "i4"),
        ("priority", "i4"),
        ("prompt_tokens", "u4"),
        ("decode_steps", "u4"),
    ]
)
SIZE = HEADER.itemsize + MAX_MODELS * MODEL.itemsize + MAX_TICKETS * TICKET.itemsize


BOARD_NAME = "ai-model-queues-{pid}.board"


def board_path(folder: Path | None = None) -> Path:
    """The same file for the engine and the API workers of one `bentoml serve`: their parent's."""
    return (folder or Path(tempfile.gettempdir())) / BOARD_NAME.format(pid=os.getppid())


def remove_abandoned_boards(folder: Path | None = None) -> list[Path]:
    """Removes the boards of servers that are gone: a server killed outright (SIGKILL, the OOM
    killer) never unlinks its own. Returns what it removed."""
    removed = []
    for path in (folder or Path(tempfile.gettempdir())).glob(BOARD_NAME.format(pid="*")):
        pid = path.name.removeprefix("ai-model-queues-").removesuffix(".board")
        if pid.isdigit() and not process_exists(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


class QueueBoard:
    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size != SIZE:  # new, or a board of another layout
                os.ftruncate(fd, 0)
                os.ftruncate(fd, SIZE)
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._map = mmap.mmap(fd, SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._header = np.ndarray((1,), HEADER, self._map, 0)
        self._models = np.ndarray((MAX_MODELS,), MODEL, self._map, HEADER.itemsize)
        self._tickets = np.ndarray((MAX_TICKETS,), TICKET, self._map, HEADER.itemsize + MAX_MODELS * MODEL.itemsize)
        self._thread_lock = threading.Lock()  # flock does not exclude the threads of one process

    @classmethod
    def of_this_server(cls) -> QueueBoard | None:
        """None where shared memory is not to be had: requests then go to the engine unchecked."""
        try:
            return cls(board_path())
        except OSError:
            return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _model_index(self, model_id: str) -> int | None:
        found = np.flatnonzero(self._models["name"] == model_id.encode())
        return int(found[0]) if found.size else None

    def _backlog(self, index: int, kind: str, view: int) -> Backlog:
        backlogs = self._models[kind][index]
        size = int(self._models["batch_size"][index])
        return Backlog(backlogs["slots"][view, :size].tolist(), int(backlogs["prompt_tokens"][view]))

    def _store(self, index: int, kind: str, view: int, backlog: Backlog) -> None:
        backlogs = self._models[kind]
        backlogs["prompt_tokens"][index, view] = backlog.prompt_tokens
        backlogs["slots"][index, view, : len(backlog.slots)] = backlog.slots

    def _recount_ahead(self, index: int) -> None:
        """The engine's backlog, then the tickets on their way in the order they were issued."""
        tickets = self._tickets
        live = np.sort(tickets[(tickets["serial"] != NO_TICKET) & (tickets["model"] == index)], order="serial")
        for view, priority in enumerate(VIEWS):
            backlog = self._backlog(index, "admitted", view)
            ahead = live[live["priority"] <= priority]
            for prompt_tokens, decode_steps in zip(ahead["prompt_tokens"].tolist(), ahead["decode_steps"].tolist()):
                backlog.add(Work(prompt_tokens, decode_steps))
            self._store(index, "ahead", view, backlog)

    # The engine's side.

    def clear(self) -> None:
        """A starting engine: whatever a previous one published is gone with it."""
        with self._locked():
            self._models[:] = np.zeros((), MODEL)
            self._tickets[:] = np.zeros((), TICKET)

    def publish(self, model_id: str, scheduler: Scheduler, admitted_ticket: int = NO_TICKET) -> None:
        """The model's rate and backlog as the scheduler has them now; `admitted_ticket` is the ticket
        of a request the scheduler has just admitted or refused, whose work it now counts itself."""
        rate = scheduler.rate
        backlogs = [scheduler.backlog(view) for view in VIEWS]
        with self._locked():
            index = self._model_index(model_id)
            if index is None:
                free = np.flatnonzero(self._models["name"] == b"")
                if not free.size:
                    return
                index = int(free[0])
            models = self._models
            models["name"][index] = model_id.encode()
            models["prompt_token_s"][index] = rate.prompt_token_s or 0.0
            models["decode_step_s"][index] = rate.decode_step_s or 0.0
            models["row_cost"][index] = rate.row_cost
            models["batch_size"][index] = scheduler.max_batch_size
            models["running"][index] = len(scheduler.running)
            models["waiting"][index] = len(scheduler.waiting)
            models["max_queue_size"][index] = scheduler.max_queue_size
            models["least_urgent"][index] = scheduler.waiting[-1].request.priority if scheduler.waiting else -1
            for view, backlog in enumerate(backlogs):
                self._store(index, "admitted", view, backlog)
            if admitted_ticket != NO_TICKET:
                self._tickets[self._tickets["serial"] == admitted_ticket] = np.zeros((), TICKET)
            self._drop_expired(time.monotonic())
            self._recount_ahead(index)

    def add_admitted(self, model_id: str, own: Work, priority: int, ticket: int = NO_TICKET) -> None:
        """A request the scheduler has just queued, without a replay of the whole queue (publish's,
        which the next step makes): its work joins each view it is in, and its ticket, whose estimate
        the views ahead already hold, goes. A burst's admissions cost a heap update each, not two
        replays of a queue that grows with the burst."""
        with self._locked():
            index = self._model_index(model_id)
            if index is None:
                return
            self._models["waiting"][index] += 1
            found = np.flatnonzero(self._tickets["serial"] == ticket) if ticket != NO_TICKET else ()
            self._tickets[found] = np.zeros((), TICKET)
            for view, view_priority in enumerate(VIEWS):
                if priority > view_priority:
                    continue
                kinds = ("admitted",) if len(found) else ("admitted", "ahead")
                for kind in kinds:
                    backlog = self._backlog(index, kind, view)
                    backlog.add(own)
                    self._store(index, kind, view, backlog)
            if self._models["least_urgent"][index] < priority:
                self._models["least_urgent"][index] = priority

    def withdraw(self, model_id: str) -> None:
        """An unloaded model: nothing is checked for it any more."""
        with self._locked():
            index = self._model_index(model_id)
            if index is not None:
                self._models[index] = np.zeros((), MODEL)
                self._tickets[self._tickets["model"] == index] = np.zeros((), TICKET)

    # The API workers' side.

    def reserve(self, model_id: str, own: Work, priority: int, allowed_s: float) -> int:
        """A ticket for the request's work on its way to the engine (NO_TICKET for a model not on the
        board); raises QueueFull when the queue and the requests on their way fill the batch's free
        slots and MAX_QUEUE_SIZE with nothing less urgent to give way, and PastDeadline when the work
        ahead of it would make it finish after `allowed_s`."""
        now = time.monotonic()
        with self._locked():
            index = self._model_index(model_id)
            if index is None:
                return NO_TICKET
            self._drop_expired(now)
            self._check_room(index, priority)
            models = self._models
            rate = ServiceRate.of(*(float(models[name][index]) for name in ("prompt_token_s", "decode_step_s", "row_cost")))
            if priority >= DEFAULT_PRIORITY and rate.prompt_token_s > 0 and rate.decode_step_s > 0:
                view = 0 if priority <= VIEWS[0] else 1
                check_deadline(self._backlog(index, "ahead", view), own, rate, allowed_s)
            ticket = self._new_ticket(now, index, own, priority)
            if ticket != NO_TICKET:
                for view in range(len(VIEWS)):
                    if priority <= VIEWS[view]:
                        backlog = self._backlog(index, "ahead", view)
                        backlog.add(own)
                        self._store(index, "ahead", view, backlog)
            return ticket

    def _check_room(self, index: int, priority: int) -> None:
        """Scheduler.add's queue cap, with the requests on their way counted as queued: a burst is
        refused here, not one by one after its hop to the engine."""
        model, tickets = self._models[index], self._tickets
        on_the_way = tickets[(tickets["serial"] != NO_TICKET) & (tickets["model"] == index)]
        queued = int(model["waiting"]) + len(on_the_way)
        free_slots = max(0, int(model["batch_size"]) - int(model["running"]))
        if queued < int(model["max_queue_size"]) + free_slots:
            return
        least_urgent = max(int(model["least_urgent"]), int(on_the_way["priority"].max(initial=-1)))
        if least_urgent <= priority:
            raise QueueFull(max(0, queued - free_slots), int(model["max_queue_size"]))

    def _drop_expired(self, now: float) -> None:
        tickets = self._tickets
        expired = (tickets["serial"] != NO_TICKET) & (tickets["created"] <= now - TICKET_TTL_S)
        if expired.any():
            models = set(tickets["model"][expired].tolist())
            tickets[expired] = np.zeros((), TICKET)
            for index in models:
                self._recount_ahead(index)

    def _new_ticket(self, now: float, model: int, own: Work, priority: int) -> int:
        tickets = self._tickets
        free = np.flatnonzero(tickets["serial"] == NO_TICKET)
        if not free.size:
            return NO_TICKET
        serial = int(self._header[0]["next_serial"]) + 1
        self._header[0]["next_serial"] = serial
        tickets[free[0]] = (serial, now, model, priority, own.prompt_tokens, own.decode_steps)
        return serial

    def release(self, ticket: int) -> None:
        """The request ended: its ticket, if the engine did not clear it (it never got the request,
        or refused it before its queue), goes, and with it its work ahead of others."""
        if ticket == NO_TICKET:
            return
        with self._locked():
            found = np.flatnonzero(self._tickets["serial"] == ticket)
            if not found.size:
                return
            index = int(self._tickets["model"][found[0]])
            self._tickets[found] = np.zeros((), TICKET)
            self._recount_ahead(index)

    def close(self) -> None:
        self._header = self._models = self._tickets = None
        self._map.close()
        os.close(self._fd)
