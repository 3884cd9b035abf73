"""The bridge between the engine's threads and its event loop: work sent off the loop, and scheduler
events sent back to it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import TypeVar

from .sequence import Event, FinishEvent

T = TypeVar("T")


async def off_loop(executor: Executor, work: Callable[[], T]) -> T:
    """`work`'s result, computed on one of the executor's threads so that the event loop keeps serving."""
    return await asyncio.get_running_loop().run_in_executor(executor, work)


class LoopMailbox:
    """Hands scheduler events to one event loop, waking it once per batch step rather than once
    per token: every wake-up costs the loop (and the GIL the scheduler thread needs) a round."""

    _by_loop: dict[asyncio.AbstractEventLoop, LoopMailbox] = {}
    _creation = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Event]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        with cls._creation:
            for closed in [other for other in cls._by_loop if other.is_closed()]:
                del cls._by_loop[closed]
            return cls._by_loop.setdefault(loop, cls(loop))

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._items.append((queue, event))
            if len(self._items) > 1:
                return  # a delivery is already scheduled and will take this one too
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            with self._lock:
                self._items.clear()

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


class EventStream:
    """Scheduler events for one sequence, handed from the scheduler thread to the asking event loop."""

    def __init__(self) -> None:
        self._mailbox = LoopMailbox.of(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(self, event: Event) -> None:
        self._mailbox.post(self._queue, event)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return
