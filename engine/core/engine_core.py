"""The engine core: one thread per loaded model that drives its scheduler and its model runner.

Each round: the scheduler plans a step (under the lock, with requests arriving from other threads),
the runner runs it (outside the lock, the only slow part), and the scheduler books its tokens.
Failures follow one ladder: a failed step fails the sequences in it; a fatal error (a broken
device) or a bug in the loop ends the thread, fails every sequence, and leaves `failure` set so
the model reads as unable to serve until it is reloaded.

A request more urgent than every sequence of the step in flight aborts that step (the runner stops
it between layers, before anything is sampled or booked): the next step is planned at once and
serves the urgent one first, instead of after the whole step. The aborted step's work is redone,
and the step that redoes it is not aborted again, so urgent traffic however dense leaves the rest
at least every other step.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from typing import TYPE_CHECKING

from .block_manager import block_hashes
from .scheduler import ScheduledStep, Scheduler, StepOutput
from .sequence import FinishEvent, FinishReason, SamplingRequest, Sequence, Sink
from .service_rate import Work

if TYPE_CHECKING:
    from .queue_board import QueueBoard

logger = logging.getLogger(__name__)

# How long the thread sleeps when sequences wait but none can run; it never happens while the
# cache can hold every admitted request, and a deadline still ends such a wait.
STALLED_WAIT_S = 0.05
# Each calibration request's tokens: the first comes with its prompt, the rest are decode steps.
CALIBRATION_TOKENS = 4


class StepAborted(Exception):
    """The runner stopped the step on request: nothing of it was sampled or is to be booked."""


class StepRunner(abc.ABC):
    """Runs a scheduled step on the model: the port the engine core drives (model_runner.py is the real one)."""

    @abc.abstractmethod
    def execute(self, step: ScheduledStep) -> StepOutput:
        """One token id per `step.sampled` sequence, in that order, with what the step's requests asked for."""

    def is_fatal(self, error: Exception) -> bool:
        """Whether the error leaves the runner unable to run any later step."""
        return False

    def abort(self) -> None:
        """Asks the step in flight to stop with StepAborted (from any thread); a runner that cannot
        stop a step lets it finish."""

    def reset_abort(self) -> None:
        """Forgets an abort asked for too late to stop the step it was for."""


class EngineCore:
    def __init__(
        self,
        scheduler: Scheduler,
        runner: StepRunner,
        batch_wait_s: float = 0.0,
        name: str = "model",
        board: QueueBoard | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.name = name
        self._board = board  # where the API workers read this model's queue (queue_board.py)
        self._runner = runner
        self.batch_wait_s = batch_wait_s
        self._wakeup = threading.Condition()
        self._stopped = False
        self._stop_reason = FinishReason.UNLOADED
        self.failure = ""  # set when the thread died: the model can serve nothing more
        self._in_flight: ScheduledStep | None = None
        self._in_flight_abortable = False
        self._owed: set[int] = set()  # the sequences of an aborted step, until a step of theirs has run
        self.aborted_steps = 0
        self._thread = threading.Thread(target=self._loop, name=f"scheduler-{name}", daemon=True)

    # Called from any thread.

    def start(self) -> None:
        self._thread.start()

    def stop(self, reason: FinishReason = FinishReason.UNLOADED) -> None:
        """Ends the thread after its current step; every sequence still there ends with `reason`."""
        with self._wakeup:
            self._stopped, self._stop_reason = True, reason
            self._wakeup.notify()
        self._thread.join(timeout=60)
        with self._wakeup:
            self.scheduler.finish_all(reason)
        if self._board is not None:
            self._board.withdraw(self.name)

    def submit(self, request: SamplingRequest, sink: Sink) -> Sequence:
        """Queues the request; raises QueueFull when the queue is full and PastDeadline when it would
        not finish in time. A request that meets a stopped core ends at once, with the reason the
        core stopped."""
        sequence = Sequence(request, sink, block_hashes(request.prompt_ids))
        with self._wakeup:
            if not self._stopped:
                waiting = len(self.scheduler.waiting)
                try:
                    self.scheduler.add(sequence, time.monotonic())
                except BaseException:  # refused: its ticket's work leaves what the workers count
                    self._publish(admitted_ticket=request.ticket)
                    raise
                if self._board is not None and len(self.scheduler.waiting) == waiting + 1:
                    work = Work(sequence.prompt_work, request.max_new_tokens)
                    self._board.add_admitted(self.name, work, request.priority, request.ticket)
                else:  # it took a less urgent one's place: that one's work left too
                    self._publish(admitted_ticket=request.ticket)
                if self._in_flight_abortable and request.priority < self._in_flight.most_urgent:
                    self._runner.abort()
                self._wakeup.notify()
                return sequence
            if self.failure:
                self.scheduler.finish(sequence, FinishReason.ERROR, self.failure)
            else:
                self.scheduler.finish(sequence, self._stop_reason)
        return sequence

    def calibrate(self, timeout_s: float = 120.0) -> None:
        """Runs short generations alone and a batch of them at once, twice (the first time warms the
        kernels up), before the first request, so that the service rate knows what a row adds to a
        step (ServiceRate.calibrate_rows): the first burst is admitted at the rate a full batch runs,
        not a lone request's."""
        rows = min(self.scheduler.max_batch_size, self.scheduler.max_queue_size)
        for count in (1, rows, 1, rows):
            finished = threading.Semaphore(0)

            def sink(event: object) -> None:
                if isinstance(event, FinishEvent):
                    finished.release()

            deadline = time.monotonic() + timeout_s
            with self._wakeup:  # all in the same step
                for token_id in range(count):
                    self.submit(SamplingRequest([token_id], CALIBRATION_TOKENS, 0.0, deadline, ignore_eos=True), sink)
            for _ in range(count):
                finished.acquire(timeout=timeout_s)
        with self._wakeup:
            self.scheduler.rate.calibrate_rows(rows)

    # The engine core's thread.

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # noqa: BLE001: a dead thread must fail its requests, never strand them
            self._fail(f"{type(error).__name__}: {error}")

    def _fail(self, failure: str) -> None:
        logger.critical("the batch scheduler stopped: %s", failure)
        with self._wakeup:
            self.failure, self._stopped = failure, True
            self.scheduler.finish_all(FinishReason.ERROR, failure)

    def _serve(self) -> None:
        while True:
            with self._wakeup:
                step = self.scheduler.schedule(time.monotonic())
                while step is None and not self._stopped:
                    # Sequences may have left (their callers gone, their deadlines passed) with no
                    # step to publish it: the board must not go on showing them ahead.
                    self._publish()
                    if self.scheduler.has_work:  # sequences wait, none can run yet
                        self._wakeup.wait(STALLED_WAIT_S)
                    else:
                        self._wakeup.wait()
                        if self.batch_wait_s:
                            self._wakeup.wait(self.batch_wait_s)  # let a burst arrive together
                    step = self.scheduler.schedule(time.monotonic())
                if self._stopped:
                    return
                self._in_flight = step
                self._in_flight_abortable = not self._owed.intersection(step.sequence_ids)
            try:
                self._run(step)
            finally:
                with self._wakeup:
                    self._in_flight, self._in_flight_abortable = None, False
                    self._runner.reset_abort()

    def _run(self, step: ScheduledStep) -> None:
        started = time.perf_counter()
        try:
            output = self._runner.execute(step)
        except StepAborted:
            self.aborted_steps += 1
            self._owed = set(step.sequence_ids)
            return
        except Exception as error:  # a failed step fails its sequences, never the scheduler...
            if self._runner.is_fatal(error):  # ...unless the device itself is broken
                raise
            logger.exception("batch step failed")
            with self._wakeup:
                self.scheduler.fail_running(f"{type(error).__name__}: {error}")
            return
        seconds = time.perf_counter() - started
        with self._wakeup:
            prompt_tokens = sum(chunk.end - chunk.start for chunk in step.prefilling)
            self.scheduler.rate.observe(prompt_tokens, len(step.decoding), seconds)
            self.scheduler.update(step, output, time.monotonic())
            self._owed.difference_update(step.sequence_ids)
            self._publish()

    def _publish(self, admitted_ticket: int = 0) -> None:
        """Under the lock: the rate and backlog the API workers shed by."""
        if self._board is not None:
            self._board.publish(self.name, self.scheduler, admitted_ticket)
