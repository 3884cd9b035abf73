"""Starts and stops real `bentoml serve` processes for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import ROOT

BENTOML = str(Path(sys.executable).parent / "bentoml")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def launch(log_path: Path, env: dict[str, str] | None = None) -> RunningService:
    port = free_port()
    command = [BENTOML, "serve", "service:AIModelService", "--host", "127.0.0.1", "--port", str(port)]
    log = log_path.open("w")
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return RunningService(f"http://127.0.0.1:{port}", process, log_path)


def wait_ready(service: RunningService, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {service.process.returncode}:\n{service.logs()[-4000:]}")
        try:
            if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    service.stop()
    raise RuntimeError(f"bentoml serve was not ready in {timeout_s}s:\n{service.logs()[-4000:]}")


def start(log_path: Path, env: dict[str, str] | None = None) -> RunningService:
    service = launch(log_path, env)
    wait_ready(service)
    return service


def batch_running(url: str) -> int:
    """Sequences in the default model's batch now."""
    return httpx.get(f"{url}/health", timeout=10).json()["loaded_models"][0]["metadata"]["batch"]["running"]


def wait_for_empty_batch(url: str, timeout_s: float = 3.0) -> float:
    started = time.monotonic()
    while batch_running(url):
        assert time.monotonic() - started < timeout_s, "the disconnected request still holds its batch slot"
        time.sleep(0.02)
    return time.monotonic() - started
