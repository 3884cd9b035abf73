"""Starts and stops real `bentoml serve` processes for the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT

BENTOML = str(Path(sys.executable).parent / "bentoml")
SERVICE = "service:AIModelService"

Samples = dict[tuple[str, frozenset], float]


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

    def engine_process(self) -> psutil.Process:
        """The generation engine's worker process, one of `bentoml serve`'s children."""
        return next(
            child for child in psutil.Process(self.process.pid).children(recursive=True)
            if "generation-engine" in " ".join(child.cmdline())
        )

    def kill(self) -> None:
        """SIGKILLs `bentoml serve` and all its workers at once, as a crashed host would. BentoML starts each
        worker in a session of its own, so killing the process group would leave them serving."""
        processes = [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def own_home(store: Path, beside: Path) -> Path:
    """A BENTOML_HOME for one server that shares `store`'s models and Bentos. A server starting empties its
    home's Prometheus directory and task database, so servers that run side by side must not share one."""
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-", dir=beside))
    for shared in ("models", "bentos"):
        if (store / shared).is_dir():
            (home / shared).symlink_to(store / shared)
    return home


def launch(
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    target: str = SERVICE,
    cwd: Path = ROOT,
    port: int | None = None,
) -> RunningService:
    """`bentoml serve TARGET` (the checkout's service, or a Bento's tag) from CWD, on PORT or a free one
    (a service restarted on its port keeps its address).

    The address comes from HOST and PORT, as in the container image, rather than from flags."""
    port = port or free_port()
    # The answers these tests expect are the bundled model's greedy fp32 answers on the CPU; on a GPU
    # machine DEVICE_TYPE=auto would serve it in bf16 on CUDA, worded otherwise. A test may set it.
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "DEVICE_TYPE": "cpu", **(env or {})}
    env["BENTOML_HOME"] = str(own_home(Path(env["BENTOML_HOME"]), log_path.parent))
    log = log_path.open("w")
    command = [BENTOML, "serve", target]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


def start(
    log_path: Path,
    env: dict[str, str] | None = None,
    *,
    target: str = SERVICE,
    cwd: Path = ROOT,
    port: int | None = None,
) -> RunningService:
    service = launch(log_path, env, target=target, cwd=cwd, port=port)
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


def scrape(http: httpx.Client) -> Samples:
    """Every sample on /metrics, by name and labels."""
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; a KeyError says the series is absent."""
    return samples[(name, frozenset(labels.items()))]
