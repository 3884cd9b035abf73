"""Chaos: clients that stop reading their streams, or read them slowly (issue 15), through a real server.

A stream whose client takes none of it for STREAM_STALL_TIMEOUT is dropped: its connection reset, its
generation cancelled (its batch slot freed), the drop logged and counted, while every other client is
served as usual. A client that reads slowly but keeps reading gets its whole stream.

The stream clients are raw sockets with a small receive buffer, which a few events fill (each token is
sent with 20 alternatives, about 1.7 KB), and a remote MSS (536): the server's kernel then gives the
connection a send buffer of tens of KB, as over a network, where a loopback peer's MSS gets one of 4 MB,
so that the server's own writes wait on a slow reader as they would on a remote one.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .server import RunningService, scrape, start, value, wait_for_empty_batch

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

STALL_TIMEOUT_S = 2
# From the client's last read to its connection's reset: a few tokens fill its receive buffer, then the
# server waits STALL_TIMEOUT_S (checking a quarter of it apart). Room for a machine shared with other test
# runs, where a token can take a second; the stalled generations, 2000 tokens each, would run for minutes.
DROP_BOUND_S = STALL_TIMEOUT_S + 20
# Once the normal clients have their answers, the dropped streams' sequences must be gone already.
EMPTY_BATCH_BOUND_S = 3
REMOTE_MSS = 536
SMALL_RECEIVE_BUFFER = 4096
TCP_ESTABLISHED = 1
FRANCE = {"query": "What is the capital of France? Answer in one sentence.", "temperature": 0}
PARIS = "The capital of France is Paris."
STORY = "Tell me a very long story about dragons."


def chat_stream(max_tokens: int) -> dict:
    """A chat completion streamed with 20 alternatives per token: about 1.7 KB an event."""
    return {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": STORY}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 20,
    }


NATIVE_STREAM = {
    "query": STORY, "max_length": 2000, "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 20
}


@pytest.fixture(scope="module")
def stall_service(tmp_path_factory) -> Iterator[RunningService]:
    """Streams of up to 2000 tokens that no deadline stops first, and no response cache: every answer is generated."""
    running = start(
        tmp_path_factory.mktemp("stalls") / "serve.log",
        {
            "STREAM_STALL_TIMEOUT": str(STALL_TIMEOUT_S),
            "RESPONSE_CACHE_SIZE": "0",
            "MAX_NEW_TOKENS": "2048",
            "MAX_GENERATION_TIME": "600",
        },
    )
    yield running
    running.stop()


def open_stream(url: str, path: str, body: dict) -> socket.socket:
    """A remote-like client that posts the body and reads the response's head, and nothing more yet."""
    host, port = url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, REMOTE_MSS)  # before connect: it goes in the SYN
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RECEIVE_BUFFER)
    client.settimeout(60)
    client.connect((host, int(port)))
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    client.sendall(head.encode() + payload)
    received = b""
    while b"\r\n\r\n" not in received:
        received += client.recv(256)
    assert received.startswith(b"HTTP/1.1 200 "), received
    return client


def reset_by_server(client: socket.socket) -> bool:
    """Whether the connection is gone, seen without reading: a server that ended it gracefully would still
    have its unread events and its end queued behind them, so only a reset ends it here."""
    return client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED


def read_to_the_end(client: socket.socket) -> tuple[bytes, OSError | None]:
    received = b""
    try:
        while chunk := client.recv(65536):
            received += chunk
    except OSError as error:
        return received, error
    return received, None


def wait_until(condition: Callable[[], bool], bound_s: float, what: str) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < bound_s, f"{what}: not within {bound_s}s"
        time.sleep(0.1)


def dropped_streams(url: str) -> float:
    with httpx.Client(base_url=url, timeout=30) as http:
        return value(scrape(http), "ai_model_streams_dropped_total", reason="stalled")


def keep_asking(url: str, stop: threading.Event) -> list[tuple[int, str | None]]:
    """/generate, once and then until told to stop: each answer's status and text."""
    answers = []
    with httpx.Client(base_url=url, timeout=120) as http:
        while not (answers and stop.is_set()):
            response = http.post("/generate", json=FRANCE)
            answers.append((response.status_code, response.json().get("result")))
    return answers


def keep_streaming(url: str, stop: threading.Event) -> list[tuple[int, str | None]]:
    """/generate/stream read at full speed, once and then until told to stop: each stream's status and
    final result."""
    answers = []
    with httpx.Client(base_url=url, timeout=120) as http:
        while not (answers and stop.is_set()):
            with http.stream("POST", "/generate/stream", json=FRANCE) as response:
                events = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]
            final = events[-1] if events else {}
            answers.append((response.status_code, final.get("result") if final.get("done") else None))
    return answers


def test_streams_whose_clients_stop_reading_are_dropped_while_every_other_client_is_served(stall_service):
    url = stall_service.url
    before = dropped_streams(url)
    stalled = [
        open_stream(url, "/v1/chat/completions", chat_stream(max_tokens=2000)),
        open_stream(url, "/generate/stream", NATIVE_STREAM),
    ]
    stop = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        normal = [pool.submit(keep_asking, url, stop) for _ in range(2)] + [pool.submit(keep_streaming, url, stop)]
        try:
            wait_until(
                lambda: all(map(reset_by_server, stalled)),
                DROP_BOUND_S,
                "the server resets the connections of the clients that stopped reading",
            )
        finally:
            stop.set()
        answers = [future.result() for future in normal]

    assert {answer for client in answers for answer in client} == {(200, PARIS)}, answers
    for client in stalled:
        received, error = read_to_the_end(client)
        assert isinstance(error, ConnectionResetError), f"the stream ended with {error!r}, not a reset"
        assert b"[DONE]" not in received and b'"done": true' not in received  # cut, not finished
        client.close()
    wait_for_empty_batch(url, timeout_s=EMPTY_BATCH_BOUND_S)
    assert dropped_streams(url) == before + 2
    logs = stall_service.logs()
    for path in ("/v1/chat/completions", "/generate/stream"):
        assert f"dropped the stream of POST {path}" in logs
    assert "STREAM_STALL_TIMEOUT" in logs


def test_a_slow_reader_that_keeps_reading_gets_its_whole_stream(stall_service):
    """4 KB every 0.2 s: slower than a quiet machine makes these events (about 50 KB/s), so bytes wait for
    this client there, and the server's writes wait on it; but it takes some every 0.2 s, never none for
    STALL_TIMEOUT_S."""
    url = stall_service.url
    before = dropped_streams(url)
    client = open_stream(url, "/v1/chat/completions", chat_stream(max_tokens=100))
    received = b""
    while not received.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
        time.sleep(0.2)
        chunk = client.recv(4096)
        assert chunk, f"the server closed the stream after {len(received)} bytes"
        received += chunk
    client.close()
    assert b'"finish_reason": "length"' in received and received.count(b"data: [DONE]") == 1
    assert dropped_streams(url) == before
