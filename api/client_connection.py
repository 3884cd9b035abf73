"""A client's TCP connection under a response, as the server's kernel sees it: how many bytes the client
has acknowledged, whether bytes wait for it, and a reset.

ASGI gives an application no handle on its connection. uvicorn's `send` is a method of its request
cycle, which holds the connection's transport (asyncio's or uvloop's); each middleware's wrapper of
`send` keeps the one it wraps in its closure, so `ClientConnection.of` follows closures down to it.
The counts come from Linux's TCP_INFO. Under another server, on another system, or over a Unix
socket there is no ClientConnection.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from starlette.types import Send

# Offsets in Linux's struct tcp_info (linux/tcp.h), and its length up to tcpi_notsent_bytes (Linux 4.6).
UNACKED_AT, BYTES_ACKED_AT, NOTSENT_BYTES_AT = 24, 120, 144
TCP_INFO_LENGTH = 148
RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: closing sends an RST and discards the unsent


class Delivery(NamedTuple):
    acknowledged: int  # bytes the client has acknowledged since the connection opened
    waiting: bool  # bytes wait for the client: in the transport, unsent in the kernel, or sent but unacknowledged


@dataclass
class ClientConnection:
    transport: Any
    socket: Any

    @classmethod
    def of(cls, send: Send) -> ClientConnection | None:
        transport = _server_transport(send)
        if transport is None or not hasattr(socket, "TCP_INFO"):
            return None
        connection = cls(transport, transport.get_extra_info("socket"))
        try:
            connection.delivery()
        except (OSError, struct.error):  # not TCP, or a kernel older than tcpi_notsent_bytes
            return None
        return connection

    def delivery(self) -> Delivery:
        info = self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LENGTH)
        (unacked,) = struct.unpack_from("I", info, UNACKED_AT)
        (acknowledged,) = struct.unpack_from("Q", info, BYTES_ACKED_AT)
        (not_sent,) = struct.unpack_from("I", info, NOTSENT_BYTES_AT)
        return Delivery(acknowledged, bool(unacked or not_sent or self.transport.get_write_buffer_size()))

    def reset(self) -> None:
        """Closes the connection at once, discarding what waits for the client (as nginx's
        reset_timedout_connection): a plain close sends it first, and waits for a client that reads nothing."""
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        self.transport.abort()


def _server_transport(send: Send) -> Any | None:
    pending, seen = [send], set()
    while pending:
        function = pending.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        transport = getattr(getattr(function, "__self__", None), "transport", None)
        if hasattr(transport, "abort") and hasattr(transport, "get_write_buffer_size"):
            return transport
        pending.extend(value for value in _captured(function) if callable(value))
    return None


def _captured(function: Callable[..., Any]) -> Iterator[Any]:
    for cell in getattr(getattr(function, "__func__", function), "__closure__", None) or ():
        try:
            yield cell.cell_contents
        except ValueError:  # a variable the function uses that is not assigned yet
            continue
