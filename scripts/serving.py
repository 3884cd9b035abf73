"""What the load scripts share: starting and stopping `bentoml serve`, and the classification prompts."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).parent / "bentoml")

TOPICS = [
    "the new bus timetable", "a charity football match", "the local library's reading club", "rising food prices",
    "a protest outside the town hall", "the election results", "a recipe for apple pie", "the heatwave",
    "vaccination at the clinic", "a new mosque opening", "the school's science fair", "a lost dog",
    "a concert in the park", "layoffs at the factory", "the river cleanup day", "a cryptocurrency scheme",
]
STANCES = [
    "Everyone is welcome, bring your friends and family.",
    "I am so angry about this, somebody should do something.",
    "Honestly it was the best day of the year, thank you all.",
    "They are ruining our country and will pay for it one day.",
    "Does anyone know more details? I could not find the announcement.",
    "Join us and fight back against those traitors, no mercy.",
    "Prices went up again, my family can barely afford groceries.",
    "Great work by the volunteers, the place looks clean again.",
]
QUESTIONS = [
    "Is this post extremist content? Answer yes or no.",
    "Does this message call for violence? Answer yes or no.",
    "Classify the sentiment of this post as positive, negative or neutral.",
    "Is this post spam? Answer yes or no.",
]

def use_the_checkout_in_process() -> None:
    """For scripts that load models in their own process: the checkout's code and model store,
    offline, untracked. Call it before importing the project's modules."""
    os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank value at fraction q (0.5: the median) of the values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def short_request(rng: random.Random) -> dict:
    post = f"Post about {rng.choice(TOPICS)}: {rng.choice(STANCES)}"
    return {"query": rng.choice(QUESTIONS), "context": [post], "max_length": 10, "temperature": 0}



def start_server(command: list[str], env: dict[str, str], ready_url: str, log: Path, timeout_s: float = 300) -> subprocess.Popen:
    """Starts a server in its own process group and waits until `ready_url` answers 200."""
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{Path(command[0]).name} exited with {process.returncode}; see {log}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop_service(process)
    sys.exit(f"{Path(command[0]).name} was not ready in {timeout_s:.0f} s; see {log}")


def start_service(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """This project's service, `bentoml serve` from the checkout, once /readyz says it is ready."""
    command = [BENTOML, "serve", "service:AIModelService", "--host", "127.0.0.1", "--port", str(port)]
    return start_server(command, env, f"http://127.0.0.1:{port}/readyz", log)


def stop_service(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def served(url: str | None, port: int, env: dict[str, str], log_name: str) -> Iterator[tuple[str, subprocess.Popen | None]]:
    """The given URL as it is, or a service started on `port` with `env` for the duration."""
    if url is not None:
        yield url, None
        return
    os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    process = start_service(env, port, ROOT / log_name)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_service(process)
