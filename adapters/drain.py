"""Graceful shutdown for a BentoML worker: on SIGTERM, stop taking work but keep answering until
the work in hand is done, then let uvicorn shut down as it would have.

uvicorn alone stops accepting at once, yet BentoML's process manager (circus) keeps the listening
socket open, so a request that arrives during shutdown would hang until its client gives up.
Deferring uvicorn's own handler keeps the worker answering: readiness says 503 and new generation
requests are refused with 503 while the ones in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

# circus kills a worker 30 s after its SIGTERM; the drain must end before that.
CIRCUS_GRACEFUL_TIMEOUT_S = 30.0
POLL_S = 0.05


def drain_limit_s(max_generation_time_s: float) -> float:
    """Long enough for a generation that has just started, short of circus' kill."""
    return min(max_generation_time_s + 1.0, CIRCUS_GRACEFUL_TIMEOUT_S - 2.0)


def defer_sigterm(busy: Callable[[], bool], on_drain: Callable[[], None], limit_s: float, quiet_s: float = 0.0) -> bool:
    """Installs the drain in this worker; False where it cannot (not the main thread, no uvicorn handler).

    `busy` says whether work is in hand; the worker stops once it has said False for `quiet_s` in a
    row (work may still be on its way from another process), or after `limit_s` in any case."""
    if threading.current_thread() is not threading.main_thread():
        return False
    shutdown = signal.getsignal(signal.SIGTERM)
    if not callable(shutdown):
        return False
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to its tasks

    async def drain_then_shut_down() -> None:
        deadline = loop.time() + limit_s
        quiet_since = loop.time()
        while loop.time() < deadline:
            if busy():
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= quiet_s:
                break
            await asyncio.sleep(POLL_S)
        else:
            logger.warning("drain limit of %.0fs reached with work in hand; shutting down anyway", limit_s)
        shutdown(signal.SIGTERM, None)

    def on_sigterm(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, shutdown)  # a second SIGTERM stops at once
        logger.info("SIGTERM: draining (at most %.0fs) before shutting down", limit_s)
        on_drain()
        loop.call_soon_threadsafe(lambda: tasks.add(loop.create_task(drain_then_shut_down())))

    signal.signal(signal.SIGTERM, on_sigterm)
    return True
