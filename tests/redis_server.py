"""A real `redis-server` on a free loopback port, for the tests of the shared response cache."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.server import free_port

REDIS_SERVER = shutil.which("redis-server")
MISSING = "redis-server is not installed: apt-get install -y redis-server (.ci/run does it)"


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    directory: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, directory: Path, port: int | None = None) -> RedisServer:
        """A cache-only server (no snapshots, no append-only file) in `directory`; waits for PING."""
        if REDIS_SERVER is None:
            raise RuntimeError(MISSING)
        port = port or free_port()
        command = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory)]
        command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        log = directory / f"redis-{port}.log"
        with log.open("w") as output:
            server = cls(port, subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT), directory)
        deadline = time.monotonic() + 10
        while not answers_ping(port):
            if server.process.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"redis-server did not start on port {port}: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        return server

    def restart(self) -> None:
        """A fresh, empty server on the same port."""
        self.kill()
        self.process = RedisServer.start(self.directory, self.port).process

    def pause(self) -> None:
        """The server stops answering but keeps its connections: Redis that is slow, not gone."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
