"""Chaos: a real service under concurrent traffic while one of its parts breaks: the engine process
killed, Redis killed and restarted, the default model unloaded mid-generation.

Each test states its bounds: REQUEST_BOUND_S, past which a request counts as hung whatever else happens,
and how soon serving (or the cache) must come back. Clients wait twice as long as the bound, so a hang
shows as a request over the bound, not as a client error."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from .server import RunningService, start

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

MODEL_ID = "smollm2-135m-instruct"
REQUEST_BOUND_S = 60
CLIENT_TIMEOUT_S = 2 * REQUEST_BOUND_S
FRANCE = {"query": "What is the capital of France? Answer in one sentence.", "temperature": 0}


@dataclass
class Outcome:
    """One request as its client saw it; `status` is "timeout" or the transport error's name where no
    answer came, and a stream's body holds its events."""

    asked: dict[str, Any]
    started: float
    finished: float = 0.0
    status: int | str = 0
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def took_s(self) -> float:
        return self.finished - self.started

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.body.get("events", [])


def parsed(text: str) -> dict[str, Any]:
    try:
        return json.loads(text)
    except ValueError:
        return {"unparsed": text}


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Outcome:
    outcome = Outcome(body, time.monotonic())
    try:
        response = await http.post(path, json=body)
        outcome.status, outcome.body = response.status_code, parsed(response.text)
    except httpx.TransportError as error:  # a timeout is one
        outcome.status = "timeout" if isinstance(error, httpx.TimeoutException) else type(error).__name__
    outcome.finished = time.monotonic()
    return outcome


async def stream(http: httpx.AsyncClient, body: dict[str, Any], first_text: asyncio.Event | None = None) -> Outcome:
    """/generate/stream read to its end; `first_text` is set when the first token's event arrives."""
    outcome = Outcome(body, time.monotonic())
    try:
        async with http.stream("POST", "/generate/stream", json=body) as response:
            outcome.status = response.status_code
            if response.status_code != 200:  # an error before the first token keeps its status
                outcome.body = parsed((await response.aread()).decode())
            else:
                outcome.body = {"events": []}
                async for line in response.aiter_lines():
                    if line:
                        outcome.events.append(json.loads(line.removeprefix("data: ")))
                        if first_text is not None and "text" in outcome.events[-1]:
                            first_text.set()
    except httpx.TransportError as error:
        outcome.status = "timeout" if isinstance(error, httpx.TimeoutException) else type(error).__name__
    outcome.finished = time.monotonic()
    return outcome


async def keep_asking(http: httpx.AsyncClient, bodies: list[dict], outcomes: list[Outcome], stop: asyncio.Event):
    """One client: /generate with each body in turn, one at a time, until `stop`."""
    while not stop.is_set():
        outcomes.append(await post(http, "/generate", bodies[len(outcomes) % len(bodies)]))


async def come_true(condition: Callable[[], bool], bound_s: float, what: str) -> float:
    """When `condition` first held (monotonic); fails naming `what` if it does not within `bound_s`."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {bound_s:g}s"
        await asyncio.sleep(0.1)
    return time.monotonic()


def hung(outcomes: list[Outcome], bound_s: float = REQUEST_BOUND_S) -> list[tuple[Any, float]]:
    return [(outcome.status, round(outcome.took_s, 1)) for outcome in outcomes if outcome.took_s > bound_s]


# The engine killed.

ENGINE_RECOVERY_BOUND_S = 120
CLIENTS = 8


@pytest.fixture
def uncached_service(tmp_path) -> RunningService:
    """No response cache: every request reaches the engine. A generous MAX_GENERATION_TIME, so that a
    machine made slow by other work does not shed the traffic (429): this test is about the crash."""
    service = start(tmp_path / "serve.log", {"RESPONSE_CACHE_SIZE": "0", "MAX_GENERATION_TIME": "120"})
    yield service
    service.stop()


async def readiness(http: httpx.AsyncClient) -> int | str:
    try:
        return (await http.get("/readyz", timeout=10)).status_code
    except httpx.TransportError as error:
        return type(error).__name__


def test_the_engine_killed_under_traffic_hangs_no_request_and_serving_resumes(uncached_service):
    """8 clients ask /generate in a loop while the engine process is SIGKILLed. BentoML restarts the
    engine, which loads the default model again. Bounds: /readyz answers 200 and a request is served
    within ENGINE_RECOVERY_BOUND_S (120 s) of the kill. A request the kill cut is sent again once, and
    the engine's socket queues new ones for the new engine, so requests ride out the restart: none may
    take over ENGINE_RECOVERY_BOUND_S either. Any that fails must be a 503 naming the engine."""
    service = uncached_service
    short = {**FRANCE, "max_length": 12}
    outcomes: list[Outcome] = []
    readiness_seen: list[int | str] = []
    killed = service.engine_process()

    async def kill_under_traffic() -> tuple[float, float, float]:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=service.url, timeout=2 * ENGINE_RECOVERY_BOUND_S) as http:
            clients = [asyncio.create_task(keep_asking(http, [short], outcomes, stop)) for _ in range(CLIENTS)]
            try:
                await come_true(lambda: sum(outcome.status == 200 for outcome in outcomes) >= CLIENTS, 60, "traffic")
                killed.kill()  # as the kernel's OOM killer would
                killed_at = time.monotonic()

                async def ready() -> bool:
                    readiness_seen.append(await readiness(http))
                    return readiness_seen[-1] == 200

                while not await ready():
                    assert time.monotonic() - killed_at < ENGINE_RECOVERY_BOUND_S, (
                        f"/readyz not 200 within {ENGINE_RECOVERY_BOUND_S}s of the kill: {set(readiness_seen)}"
                    )
                    await asyncio.sleep(0.2)
                ready_at = time.monotonic()
                recovered_at = await come_true(
                    lambda: any(outcome.status == 200 and outcome.started >= ready_at for outcome in outcomes),
                    killed_at + ENGINE_RECOVERY_BOUND_S - ready_at,
                    f"an answer after /readyz was 200, within {ENGINE_RECOVERY_BOUND_S}s of the kill",
                )
                await asyncio.sleep(3)  # traffic after recovery, all of which must be served
            finally:
                stop.set()
                await asyncio.wait(clients)
        return killed_at, ready_at, recovered_at

    killed_at, ready_at, recovered_at = asyncio.run(kill_under_traffic())

    print(
        f"{len(outcomes)} requests, the longest {max(o.took_s for o in outcomes):.1f}s; /readyz 200 "
        f"{ready_at - killed_at:.1f}s and served again {recovered_at - killed_at:.1f}s after the kill; "
        f"statuses {Counter(o.status for o in outcomes)}"
    )
    slow = hung(outcomes, ENGINE_RECOVERY_BOUND_S)
    assert not slow, f"requests past ENGINE_RECOVERY_BOUND_S={ENGINE_RECOVERY_BOUND_S}s: {slow}"
    assert set(readiness_seen) - {200}, f"/readyz never failed after the kill: {readiness_seen}"
    failed = [outcome for outcome in outcomes if outcome.status != 200]
    unclear = [
        (outcome.status, outcome.body) for outcome in failed
        if outcome.status != 503
        or outcome.body.get("error_type") != "engine_unavailable"
        or "generation engine" not in outcome.body.get("error", "")
    ]
    assert not unclear, f"failures that are not 503 engine_unavailable naming the engine: {unclear[:5]}"
    after_recovery = [outcome.status for outcome in outcomes if outcome.started >= recovered_at]
    assert after_recovery and set(after_recovery) == {200}, f"requests after recovery: {after_recovery}"
    assert all("Paris" in outcome.body["result"] for outcome in outcomes if outcome.status == 200)

    restarted = service.engine_process()
    assert restarted.pid != killed.pid
    health = httpx.get(f"{service.url}/health", timeout=10).json()
    assert health["default_model_loaded"] and health["status"] == "healthy", health

    async def batch() -> list[Outcome]:
        async with httpx.AsyncClient(base_url=service.url, timeout=CLIENT_TIMEOUT_S) as http:
            return await asyncio.gather(*(post(http, "/generate", short) for _ in range(2 * CLIENTS)))

    after = asyncio.run(batch())
    assert [outcome.status for outcome in after] == [200] * len(after), [outcome.body for outcome in after]
    assert all("Paris" in outcome.body["result"] for outcome in after)


# Redis killed and restarted, then a model unloaded: one service, since neither leaves a trace the other sees.

CACHE_HITS_BOUND_S = 30
QUESTIONS = [
    {"query": query, "temperature": 0, "max_length": 16}
    for query in ("Name three colours.", "What is the capital of France?", "Name a large animal.")
]


@pytest.fixture(scope="module")
def shared_service(cache_redis, tmp_path_factory) -> RunningService:
    """The response cache in Redis; a small batch, so that a burst queues; long generations allowed."""
    env = {
        "REDIS_URL": cache_redis.url,
        "MAX_BATCH_SIZE": "4",
        "MAX_NEW_TOKENS": "256",
        # Generous, so that a machine made slow by other work does not shed these tests' bursts (429).
        "MAX_GENERATION_TIME": "600",
    }
    service = start(tmp_path_factory.mktemp("shared") / "serve.log", env)
    yield service
    service.stop()


def test_redis_killed_and_restarted_under_cached_traffic_answers_every_request_and_hits_resume(
    shared_service, cache_redis
):
    """4 clients ask the same deterministic questions in a loop, served from Redis, while Redis is killed
    and then started again, empty, on its port. Bounds: no request takes over REQUEST_BOUND_S (60 s);
    cached answers come again within CACHE_HITS_BOUND_S (30 s) of the restart."""
    outcomes: list[Outcome] = []

    async def kill_and_restart_redis() -> tuple[dict[str, str], float, float, float]:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=shared_service.url, timeout=CLIENT_TIMEOUT_S) as http:
            first = [await post(http, "/generate", question) for question in QUESTIONS]
            assert [outcome.status for outcome in first] == [200] * len(QUESTIONS), [o.body for o in first]
            expected = {outcome.asked["query"]: outcome.body["result"] for outcome in first}
            clients = [asyncio.create_task(keep_asking(http, QUESTIONS, outcomes, stop)) for _ in range(4)]
            try:
                await come_true(lambda: sum(o.body.get("cached", False) for o in outcomes) >= 8, 60, "cache hits")
                cache_redis.kill()
                killed_at = time.monotonic()
                await come_true(lambda: sum(o.started > killed_at for o in outcomes) >= 8, 60, "answers without Redis")
                await asyncio.to_thread(cache_redis.restart)
                restarted_at = time.monotonic()
                hits_at = await come_true(
                    lambda: any(o.started > restarted_at and o.body.get("cached") for o in outcomes),
                    CACHE_HITS_BOUND_S,
                    "a cache hit after Redis restarted",
                )
            finally:
                stop.set()
                await asyncio.wait(clients)
        return expected, killed_at, restarted_at, hits_at

    expected, killed_at, restarted_at, hits_at = asyncio.run(kill_and_restart_redis())

    down_s, hits_after_s = restarted_at - killed_at, hits_at - restarted_at
    print(f"{len(outcomes)} requests; Redis down {down_s:.1f}s; cache hits again {hits_after_s:.1f}s after its restart")
    assert not hung(outcomes), f"requests past REQUEST_BOUND_S={REQUEST_BOUND_S}s: {hung(outcomes)}"
    assert {outcome.status for outcome in outcomes} == {200}, [o.body for o in outcomes if o.status != 200][:5]
    wrong = [(o.asked["query"], o.body["result"]) for o in outcomes if o.body["result"] != expected[o.asked["query"]]]
    assert not wrong, f"answers unlike the first, uncached ones: {wrong[:5]}"
    during_outage = [o for o in outcomes if o.started > killed_at and o.finished < restarted_at]
    assert during_outage and not any(o.body["cached"] for o in during_outage), "a cached answer while Redis was down"


# Sampled, so never answered from the response cache: each request reaches the engine.
LONG_STREAM = {"query": "Tell a long story about dragons.", "max_length": 256, "temperature": 0.7, "ignore_eos": True}
POEM = {"query": "Write a short poem about the sea.", "max_length": 48, "temperature": 0.7}
UNLOADED_ERRORS = {"model_unloading", "model_not_loaded"}


async def queued(http: httpx.AsyncClient) -> int:
    health = (await http.get("/health", timeout=30)).json()
    return sum(model["metadata"]["batch"]["waiting"] for model in health["loaded_models"])


def clear_about_the_model(body: dict[str, Any]) -> bool:
    return body.get("error_type") in UNLOADED_ERRORS and MODEL_ID in body.get("error", "")


def test_the_model_unloaded_under_running_and_queued_requests_answers_each_or_fails_it_clearly(shared_service):
    """Two long streams run, 34 generations and 4 short streams queue behind them (MAX_BATCH_SIZE=4), and the
    default model is unloaded. Each request gets its answer or a 503 naming the model; a stream cut
    mid-way ends with an error event. Bound: no request takes over REQUEST_BOUND_S (60 s). Then the
    model loads again and serves."""
    url = shared_service.url

    async def unload_under_traffic() -> tuple[list[Outcome], list[Outcome], httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S) as http:
            first_texts = [asyncio.Event(), asyncio.Event()]
            running = [asyncio.create_task(stream(http, LONG_STREAM, first_text)) for first_text in first_texts]
            await asyncio.wait_for(asyncio.gather(*(first_text.wait() for first_text in first_texts)), REQUEST_BOUND_S)
            later = [asyncio.create_task(post(http, "/generate", POEM)) for _ in range(34)]
            later += [asyncio.create_task(stream(http, POEM)) for _ in range(4)]
            deadline = time.monotonic() + REQUEST_BOUND_S
            while await queued(http) < 20:
                assert time.monotonic() < deadline, f"20 requests not queued within {REQUEST_BOUND_S}s"
                await asyncio.sleep(0.2)
            unloaded = await http.post("/unload-model", json={})
            return await asyncio.gather(*running), await asyncio.gather(*later), unloaded

    running, later, unloaded = asyncio.run(unload_under_traffic())
    everyone = running + later
    print("outcomes:", Counter((o.status, (o.events[-1] if o.events else o.body).get("error_type")) for o in everyone))

    assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded", unloaded.text
    assert not hung(everyone), f"requests past REQUEST_BOUND_S={REQUEST_BOUND_S}s: {hung(everyone)}"
    failed = [outcome for outcome in everyone if outcome.status != 200]
    unclear = [(o.status, o.body) for o in failed if o.status != 503 or not clear_about_the_model(o.body)]
    assert not unclear, f"failures that are not 503 naming the unloaded model: {unclear[:5]}"
    for cut in running:
        assert cut.status == 200 and clear_about_the_model(cut.events[-1]), f"a running stream's end: {cut.events[-3:]}"
    streams = [outcome for outcome in later[34:] if outcome.status == 200]
    assert all(outcome.events[-1].get("done") or clear_about_the_model(outcome.events[-1]) for outcome in streams)
    generations = later[:34]
    assert any(outcome.status == 503 for outcome in generations), "no queued generation met the unload"
    assert all(outcome.body["completion_tokens"] > 0 for outcome in generations if outcome.status == 200)

    loaded = httpx.post(f"{url}/load-model", json={}, timeout=CLIENT_TIMEOUT_S)
    assert loaded.status_code == 200 and loaded.json()["model"]["is_loaded"], loaded.text
    france = httpx.post(f"{url}/generate", json={**FRANCE, "max_length": 20}, timeout=CLIENT_TIMEOUT_S)
    assert france.status_code == 200 and "Paris" in france.json()["result"] and not france.json()["cached"], france.text
