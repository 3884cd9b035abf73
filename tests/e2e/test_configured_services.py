"""Servers started with other settings: limits that fail requests, bad configuration, the Qwen path."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import ROOT

from .server import launch, start, wait_for_empty_batch


@pytest.fixture
def run_service(tmp_path):
    started = []

    def run(**env: str):
        service = start(tmp_path / f"serve-{len(started)}.log", env)
        started.append(service)
        return service

    yield run
    for service in started:
        service.stop()


def test_bad_configuration_stops_start_up_naming_the_variable(tmp_path):
    bad = {"CPU_THREADS": "many", "GPU_MEMORY_FRACTION": "1.5", "QUANTIZATION": "int4"}
    service = launch(tmp_path / "bad.log", bad)
    assert service.process.wait(timeout=60) != 0
    logs = service.logs()
    assert "CPU_THREADS='many'" in logs and "GPU_MEMORY_FRACTION='1.5'" in logs
    assert "QUANTIZATION='int4': Value error, must be one of none, int8" in logs


def test_an_int8_service_answers_paris_and_shows_its_quantization_and_memory(run_service):
    service = run_service(QUANTIZATION="int8")
    france = {"query": "What is the capital of France? Answer in one sentence.", "temperature": 0, "max_length": 20}
    response = httpx.post(f"{service.url}/generate", json=france, timeout=60)
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["result"]

    models = httpx.get(f"{service.url}/models", timeout=10).json()["models"]
    metadata = next(model for model in models if model["is_loaded"])["metadata"]
    float32_mb = metadata["parameters"] * 4 / 2**20
    assert metadata["quantization"] == "int8" and metadata["memory_mb"] < 0.5 * float32_mb
    health = httpx.get(f"{service.url}/health", timeout=10).json()
    assert health["loaded_models"][0]["metadata"]["quantization"] == "int8"
    usage = httpx.get(f"{service.url}/memory-usage", timeout=10).json()
    assert usage["loaded_models"][0]["quantization"] == "int8"
    assert usage["loaded_models"][0]["memory_mb"] == metadata["memory_mb"]


def test_generation_past_max_generation_time_answers_504_and_the_service_goes_on(run_service):
    service = run_service(MAX_GENERATION_TIME="0.3", MAX_NEW_TOKENS="400")
    story = {"query": "Write a long story about a dragon.", "max_length": 400, "temperature": 0}
    response = httpx.post(f"{service.url}/generate", json=story, timeout=60)
    assert response.status_code == 504, response.text
    assert response.json()["error_type"] == "generation_timeout"
    assert "MAX_GENERATION_TIME=0.3s" in response.json()["error"]
    assert httpx.get(f"{service.url}/health", timeout=10).status_code == 200


def test_load_past_the_memory_limits_answers_507_with_the_numbers(run_service):
    service = run_service(MIN_MEMORY_GB="100000", PRELOAD_DEFAULT_MODEL="false")
    for path, body in (("/load-model", {}), ("/generate", {"query": "hi"})):
        response = httpx.post(f"{service.url}{path}", json=body, timeout=60)
        assert response.status_code == 507, response.text
        assert response.json()["error_type"] == "insufficient_memory"
        assert "MIN_MEMORY_GB=100000" in response.json()["error"] and "GB" in response.json()["error"]
    assert httpx.get(f"{service.url}/health", timeout=10).json()["loaded_models_count"] == 0


def test_the_specs_curl_example_verbatim_once_a_qwen_model_is_imported(run_service, tmp_path, tiny_qwen_dir):
    """A Qwen2 directory imported as qwen-model_full (random tiny weights, in a throw-away store)."""
    store = str(tmp_path / "home")
    script = str(ROOT / "scripts" / "import_model.py")
    subprocess.run(
        [sys.executable, script, "--from", str(tiny_qwen_dir), "--name", "qwen-model_full"],
        env={**os.environ, "BENTOML_HOME": store},
        check=True,
        capture_output=True,
    )
    service = run_service(BENTOML_HOME=store, DEFAULT_MODEL_ID="qwen-model_full")
    curl = json.dumps({"query": "тест", "model_id": "qwen-model_full"})
    response = httpx.post(
        f"{service.url}/generate", content=curl, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == "qwen-model_full" and body["completion_tokens"] >= 1
    assert isinstance(body["result"], str)
    health = httpx.get(f"{service.url}/health", timeout=10).json()
    assert health["loaded_models"][0]["metadata"]["architecture"] == "Qwen2ForCausalLM"


def test_a_default_model_missing_from_the_store_stops_start_up_with_the_fix(tmp_path):
    service = launch(tmp_path / "missing.log", {"DEFAULT_MODEL_ID": "never-imported"})
    assert service.process.wait(timeout=60) != 0
    assert "DEFAULT_MODEL_ID='never-imported' is not in the model store" in service.logs()
    assert "scripts/import_model.py" in service.logs()


def test_clients_that_disconnect_free_their_batch_slot(run_service):
    service = run_service(MAX_NEW_TOKENS="2000", MAX_GENERATION_TIME="120")
    story = {"query": "Tell a very long story about dragons.", "max_length": 1500, "temperature": 0}
    with httpx.Client(base_url=service.url, timeout=60) as http:
        with http.stream("POST", "/generate/stream", json=story) as response:
            assert response.status_code == 200
            for number, _ in enumerate(response.iter_lines()):
                if number == 6:
                    break
        assert wait_for_empty_batch(service.url) < 3.0

    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{service.url}/generate", json=story, timeout=1.5)
    assert wait_for_empty_batch(service.url) < 3.0
    answer = httpx.post(f"{service.url}/generate", json={"query": "What is the capital of France?", "temperature": 0})
    assert "Paris" in answer.json()["result"]


def test_a_burst_past_the_queue_gets_429_at_once_and_the_service_goes_on(run_service):
    # No response cache: the 200 identical requests must all queue for the engine.
    service = run_service(MAX_BATCH_SIZE="16", MAX_CONCURRENT_REQUESTS="32", RESPONSE_CACHE_SIZE="0")
    body = {"query": "Is this post spam? Answer yes or no.", "context": ["Buy cheap watches now!"], "temperature": 0}

    async def burst() -> list[tuple[int, float, str | None]]:
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=limits) as http:

            async def one() -> tuple[int, float, str | None]:
                started = time.monotonic()
                response = await http.post("/generate", json=body)
                return response.status_code, time.monotonic() - started, response.headers.get("retry-after")

            return await asyncio.gather(*(one() for _ in range(200)))

    results = asyncio.run(burst())
    statuses = {status for status, _, _ in results}
    assert statuses <= {200, 429}, statuses
    refused = [(seconds, retry_after) for status, seconds, retry_after in results if status == 429]
    assert refused and len(refused) < 200
    assert all(retry_after == "1" for _, retry_after in refused)
    latencies = sorted(seconds for seconds, _ in refused)
    print(f"{len(refused)} refused: median {latencies[len(latencies) // 2] * 1000:.0f} ms, slowest {latencies[-1] * 1000:.0f} ms")
    answer = httpx.post(f"{service.url}/generate", json=body, timeout=60)
    assert answer.status_code == 200


def test_sigterm_drains_readiness_503_new_requests_503_the_one_in_flight_finishes_then_exit_0(tmp_path):
    service = start(tmp_path / "drain.log", {"MAX_NEW_TOKENS": "150"})
    story = {"query": "Tell a long story about dragons.", "max_length": 150, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{service.url}/generate", json=story, timeout=120)
        time.sleep(1.0)
        service.process.send_signal(signal.SIGTERM)  # as a container runtime stops PID 1
        time.sleep(0.3)
        readiness = httpx.get(f"{service.url}/readyz", timeout=5)
        refused = httpx.post(f"{service.url}/generate", json={"query": "hi"}, timeout=5)
        liveness = httpx.get(f"{service.url}/livez", timeout=5)
        answer = in_flight.result()
    assert readiness.status_code == 503
    assert refused.status_code == 503 and refused.json()["error_type"] == "shutting_down"
    assert refused.headers["retry-after"] == "1"
    assert liveness.status_code == 200
    assert answer.status_code == 200 and answer.json()["completion_tokens"] > 0
    assert service.process.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{service.url}/readyz", timeout=2)


def test_a_crashed_engine_makes_readiness_503_not_500_and_it_recovers(run_service):
    service = run_service()
    service.engine_process().kill()  # as the kernel's OOM killer would
    readiness, liveness = set(), set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and 200 not in readiness:
        try:
            readiness.add(httpx.get(f"{service.url}/readyz", timeout=10).status_code)
        except httpx.TimeoutException:
            readiness.add("timeout")
        liveness.add(httpx.get(f"{service.url}/livez", timeout=10).status_code)
        time.sleep(0.2)
    assert 503 in readiness and 500 not in readiness, readiness
    assert readiness <= {503, 200, "timeout"}, readiness
    assert liveness == {200}
    france = httpx.post(f"{service.url}/generate", json={"query": "What is the capital of France?"}, timeout=60)
    assert france.status_code == 200, france.text


def engine_rss_mb(url: str) -> float:
    return httpx.get(f"{url}/memory-usage", timeout=30).json()["rss_mb"]


def test_load_and_unload_under_16_streams_give_no_500_and_give_the_memory_back(run_service):
    # No response cache: every stream must reach the engine while the model comes and goes.
    service = run_service(PRELOAD_DEFAULT_MODEL="false", RESPONSE_CACHE_SIZE="0")
    france = {"query": "What is the capital of France? Answer in one sentence.", "temperature": 0}

    async def sixteen_streams(flips: int) -> tuple[list[int], list[dict], int]:
        statuses, stream_errors = [], []
        served = 0
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as http:

            async def stream_once() -> bool:
                async with http.stream("POST", "/generate/stream", json=france) as response:
                    statuses.append(response.status_code)
                    if response.status_code != 200:
                        stream_errors.append(json.loads(await response.aread()))
                        return False  # an error before the first token keeps its status
                    errors_before = len(stream_errors)
                    async for line in response.aiter_lines():
                        if '"error_type"' in line:
                            stream_errors.append(json.loads(line[6:]))
                    return len(stream_errors) == errors_before

            async def client(streams: int) -> None:
                # As a caller would: a stream that meets an unload is asked again, after a pause.
                nonlocal served
                deadline = time.monotonic() + 120
                while streams and time.monotonic() < deadline:
                    if await stream_once():
                        served += 1
                        streams -= 1
                    else:
                        await asyncio.sleep(0.2)

            async def flip_model() -> None:
                for _ in range(flips):
                    await asyncio.sleep(0.7)
                    for route in ("/unload-model", "/load-model"):
                        response = await http.post(route, json={})
                        statuses.append(response.status_code)
                        if response.status_code != 200:
                            stream_errors.append({"error_type": route, "error": response.text})
                        await asyncio.sleep(0.3)

            await asyncio.gather(flip_model(), *(client(4) for _ in range(16)))
            await http.post("/unload-model", json={})
        return statuses, stream_errors, served

    asyncio.run(sixteen_streams(flips=1))  # the first traffic allocates what later traffic reuses
    before = engine_rss_mb(service.url)
    statuses, stream_errors, served = asyncio.run(sixteen_streams(flips=3))
    after = engine_rss_mb(service.url)
    print(f"engine RSS with the model unloaded: {before:.0f} MB before, {after:.0f} MB after 3 load/unload cycles;"
          f" {len(stream_errors)} streams met an unload")
    assert not [status for status in statuses if status >= 500 and status != 503], (statuses, stream_errors)
    unexpected = [error for error in stream_errors if error["error_type"] not in {"model_unloading", "model_not_loaded"}]
    assert not unexpected, unexpected
    assert served == 64  # every stream that met an unload was served when asked again
    assert after < before * 1.10


def test_cpu_threads_below_the_core_count_sets_the_engines_torch_threads(run_service):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("CPU_THREADS below the core count needs at least 2 cores; this machine has 1")
    service = run_service(CPU_THREADS="1")

    info = httpx.get(f"{service.url}/system-info", timeout=30).json()

    assert info["torch_threads"] == 1 and info["cpu_count"] >= 2
