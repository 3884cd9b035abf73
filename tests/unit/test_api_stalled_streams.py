"""EventStreamResponse: a client that takes none of its stream for the stall timeout loses it; one that
reads slowly but keeps reading gets all of it. The server's connection is a fake of uvicorn's over a fake
kernel, except in the last test, which reads a real TCP connection's counts."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import AsyncGenerator

import pytest
from prometheus_client import REGISTRY

from api.admission import AdmissionGate, AdmissionMiddleware
from api.client_connection import (
    BYTES_ACKED_AT,
    NOTSENT_BYTES_AT,
    RESET_ON_CLOSE,
    TCP_INFO_LENGTH,
    UNACKED_AT,
    ClientConnection,
)
from api.streaming import EventStreamResponse

STALL_TIMEOUT_S = 0.2
SCOPE = {"type": "http", "method": "POST", "path": "/generate/stream", "client": ("10.0.0.7", 51234), "headers": []}


def dropped() -> float:
    return REGISTRY.get_sample_value("ai_model_streams_dropped_total", {"reason": "stalled"})


class FakeKernelSocket:
    """The server's socket: TCP_INFO from what the fake client has taken, and the options set on it."""

    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection
        self.options: dict[tuple[int, int], bytes] = {}

    def getsockopt(self, level: int, option: int, length: int) -> bytes:
        assert (level, option) == (socket.IPPROTO_TCP, socket.TCP_INFO)
        info = bytearray(TCP_INFO_LENGTH)
        struct.pack_into("Q", info, BYTES_ACKED_AT, self.connection.taken)
        struct.pack_into("I", info, NOTSENT_BYTES_AT, self.connection.written - self.connection.taken)
        struct.pack_into("I", info, UNACKED_AT, 0)
        return bytes(info[:length])

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        self.options[level, option] = value


class FakeTransport:
    def __init__(self, connection: FakeConnection) -> None:
        self.connection = connection
        self.socket = FakeKernelSocket(connection)
        self.aborted = False

    def get_extra_info(self, name: str) -> FakeKernelSocket | None:
        return self.socket if name == "socket" else None

    def get_write_buffer_size(self) -> int:
        return 0  # the kernel takes every write: only the client's reading is watched

    def abort(self) -> None:
        self.aborted = True
        self.connection.lost.set()


class FakeConnection:
    """uvicorn's request cycle: `send` is its method and it holds the transport. The kernel takes the first
    `room` messages (all when None) at once, and then none: the next write waits; the client takes the
    bytes when `read` is called."""

    def __init__(self, room: int | None = None) -> None:
        self.transport = FakeTransport(self)
        self.room = room
        self.sent: list[dict] = []
        self.written = 0
        self.taken = 0
        self.lost = asyncio.Event()

    async def send(self, message: dict) -> None:
        if self.room is not None and len(self.sent) >= self.room:
            await asyncio.Event().wait()
        self.sent.append(message)
        self.written += len(message.get("body", b""))

    async def receive(self) -> dict:
        await self.lost.wait()
        return {"type": "http.disconnect"}

    def read(self, most: int) -> None:
        self.taken = min(self.written, self.taken + most)

    @property
    def body(self) -> bytes:
        return b"".join(message.get("body", b"") for message in self.sent if message["type"] == "http.response.body")


def wrapped(send):
    """A middleware's wrapper of `send`, as BentoML's and OpenTelemetry's are."""

    async def middleware_send(message: dict) -> None:
        await send(message)

    return middleware_send


class Events:
    """`count` events (endless when None), `pause_s` apart; `closed` once the generator is closed."""

    def __init__(self, count: int | None = None, pause_s: float = 0.01) -> None:
        self.count = count
        self.pause_s = pause_s
        self.closed = False

    async def stream(self) -> AsyncGenerator[str, None]:
        try:
            sent = 0
            while self.count is None or sent < self.count:
                yield f"data: {sent}\n\n"
                sent += 1
                await asyncio.sleep(self.pause_s)
        finally:
            self.closed = True


def serve(events: Events, connection: FakeConnection, app=None, reader_pace_s: float | None = None) -> tuple[float, bool]:
    """Serves the events to the connection through a middleware's `send`, the client reading 8 bytes every
    `reader_pace_s` (never when None): the seconds it took, and whether the events were closed when it
    ended (the loop's own shutdown closes them later anyway)."""

    async def reader() -> None:
        while True:
            await asyncio.sleep(reader_pace_s)
            connection.read(8)

    async def scenario() -> tuple[float, bool]:
        started = time.monotonic()
        reading = asyncio.ensure_future(reader()) if reader_pace_s is not None else None
        async with asyncio.timeout(10):  # a stream that is never dropped fails here instead of hanging
            await (app or EventStreamResponse(events.stream(), STALL_TIMEOUT_S))(
                dict(SCOPE), connection.receive, wrapped(connection.send)
            )
        if reading is not None:
            reading.cancel()
        return time.monotonic() - started, events.closed

    return asyncio.run(scenario())


@pytest.mark.parametrize("room", [None, 3], ids=["before-writes-wait", "while-a-write-waits"])
def test_a_client_that_stops_reading_loses_its_stream_after_the_stall_timeout(caplog, room):
    """Whether or not the kernel still takes the server's writes: the drop does not wait for them to block."""
    events, connection = Events(), FakeConnection(room)
    before = dropped()
    with caplog.at_level(logging.WARNING, logger="api.streaming"):
        took, closed = serve(events, connection)
    bound = STALL_TIMEOUT_S * 1.25 + 0.5  # a check every quarter of the timeout, and room for a busy machine
    assert STALL_TIMEOUT_S <= took < bound, f"dropped after {took:.2f}s, not within {bound}s"
    assert closed, "the events (and so the generation) are left open"
    assert connection.transport.aborted, "the connection is not closed"
    assert connection.transport.socket.options == {(socket.SOL_SOCKET, socket.SO_LINGER): RESET_ON_CLOSE}
    assert connection.sent[-1]["more_body"], "the response was ended as if complete"
    assert dropped() == before + 1
    assert "dropped the stream of POST /generate/stream to 10.0.0.7:51234" in caplog.text
    assert "STREAM_STALL_TIMEOUT" in caplog.text


def test_a_client_that_reads_slowly_but_keeps_reading_gets_the_whole_stream():
    """The client takes 8 bytes a third of the stall timeout, far less than the stream sends."""
    events, connection = Events(count=60), FakeConnection()
    before = dropped()
    took, _ = serve(events, connection, reader_pace_s=STALL_TIMEOUT_S / 3)
    assert took > 2 * STALL_TIMEOUT_S and connection.taken < connection.written / 2
    assert connection.body == b"".join(f"data: {number}\n\n".encode() for number in range(60))
    assert connection.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert not connection.transport.aborted and dropped() == before


def test_a_stream_with_nothing_waiting_for_its_client_is_not_dropped_however_long_the_pause():
    """A slow first token, or a slow model: the client has taken all there is, so it is not stalled."""
    events, connection = Events(count=3, pause_s=3 * STALL_TIMEOUT_S), FakeConnection()
    before = dropped()

    async def eager_client() -> None:
        while True:
            await asyncio.sleep(0.01)
            connection.read(1 << 20)

    async def scenario() -> None:
        reading = asyncio.ensure_future(eager_client())
        await EventStreamResponse(events.stream(), STALL_TIMEOUT_S)(dict(SCOPE), connection.receive, connection.send)
        reading.cancel()

    asyncio.run(scenario())
    assert connection.sent[-1]["more_body"] is False and dropped() == before


def test_without_a_connection_to_watch_the_stream_is_served_unbounded():
    events, sent = Events(count=2), []

    async def send(message: dict) -> None:  # a test client's: no transport behind it
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()

    asyncio.run(EventStreamResponse(events.stream(), STALL_TIMEOUT_S)(dict(SCOPE), receive, send))
    assert b"".join(message.get("body", b"") for message in sent) == b"data: 0\n\ndata: 1\n\n"


def test_a_dropped_stream_gives_back_its_admission_slot():
    events, connection = Events(), FakeConnection()
    gate = AdmissionGate(limit=1)
    admitted = AdmissionMiddleware(EventStreamResponse(events.stream(), STALL_TIMEOUT_S), {"/generate/stream"}, gate)
    _, closed = serve(events, connection, admitted)
    assert closed and connection.transport.aborted and gate.in_flight == 0


class SocketTransport:
    """A transport over a real socket that holds nothing itself."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> socket.socket:
        return self.sock

    def get_write_buffer_size(self) -> int:
        return 0


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="the counts come from Linux's TCP_INFO")
def test_the_counts_are_the_kernels_for_a_real_connection():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            server.setblocking(False)
            connection = ClientConnection(SocketTransport(server), server)
            assert not connection.delivery().waiting
            try:
                while True:  # until the kernel holds all it will for a client that reads nothing
                    server.send(b"x" * 65536)
            except BlockingIOError:
                pass
            time.sleep(0.1)
            stalled = connection.delivery()
            time.sleep(0.1)
            assert connection.delivery() == stalled and stalled.waiting and stalled.acknowledged > 0
            read = sum(len(client.recv(4096)) for _ in range(8))
            time.sleep(0.1)
            assert connection.delivery().acknowledged >= stalled.acknowledged + read // 2
