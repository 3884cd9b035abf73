"""External models and fallback chains through two real `bentoml serve` processes: a second serve of
this project is the provider (on a fixed port, so it can be killed and restarted there), declared in
the first one's providers file; called with the official `openai` package and `bentoml.SyncHTTPClient`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import bentoml
import httpx
import openai
import pytest
from bentoml.exceptions import BentoMLException

from .server import RunningService, Samples, free_port, scrape, start, value

LOCAL = "smollm2-135m-instruct"
REMOTE = "remote-smol"
WRONG_KEY = "remote-wrong-key"
CHAIN = "local-then-remote"
SECRET = "provider-test-secret"
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
FAILURE_THRESHOLD = 3
HOG_TOKENS = 256  # a long local generation: several seconds on the CPU
COOLDOWN_S = 3
PROVIDER_ENV = {
    "MAX_PROCESSES": "1",
    # One generation at a time in its one worker: a second one at once gets its 429, with Retry-After.
    "MAX_CONCURRENT_REQUESTS": "1",
    "MAX_NEW_TOKENS": "32",
    "API_KEYS": SECRET,
}


@dataclass
class Provider:
    """The provider's serve process, replaced when it is restarted on its port."""

    port: int
    log_dir: Path
    running: RunningService | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        self.running = start(self.log_dir / f"provider-{self.starts}.log", PROVIDER_ENV, port=self.port)

    def kill(self) -> None:
        self.running.kill()


@pytest.fixture(scope="module")
def provider(tmp_path_factory) -> Iterator[Provider]:
    provider = Provider(free_port(), tmp_path_factory.mktemp("provider"))
    provider.start()
    yield provider
    provider.running.stop()


def providers_file(path: Path, port: int) -> Path:
    url = f"http://127.0.0.1:{port}/v1"
    path.write_text(
        f"""
models:
  - model_id: {REMOTE}
    base_url: {url}
    model: {LOCAL}
    api_key_env: REMOTE_KEY
    timeout_s: 30
    max_retries: 1
    circuit_breaker: {{failure_threshold: {FAILURE_THRESHOLD}, cooldown_s: {COOLDOWN_S}}}
  - model_id: {WRONG_KEY}
    base_url: {url}
    model: {LOCAL}
    api_key_env: WRONG_REMOTE_KEY
fallbacks:
  {CHAIN}: [{LOCAL}, {REMOTE}]
"""
    )
    return path


@pytest.fixture(scope="module")
def first(tmp_path_factory, provider) -> Iterator[RunningService]:
    """The service under test. One API worker, so one circuit breaker sees every call; one sequence in
    the local batch and one in its queue, so two long generations put the local model over its cap."""
    directory = tmp_path_factory.mktemp("first")
    env = {
        "MAX_PROCESSES": "1",
        "PROVIDERS_FILE": str(providers_file(directory / "providers.yaml", provider.port)),
        "REMOTE_KEY": SECRET,
        "WRONG_REMOTE_KEY": "not-the-secret",
        "MAX_BATCH_SIZE": "1",
        "MAX_QUEUE_SIZE": "1",
        "MAX_NEW_TOKENS": str(HOG_TOKENS),
    }
    running = start(directory / "first.log", env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(first) -> Iterator[openai.OpenAI]:
    # No retries: each 429 and 5xx must show here.
    with openai.OpenAI(base_url=f"{first.url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def bento_client(first) -> Iterator[bentoml.SyncHTTPClient]:
    with bentoml.SyncHTTPClient(first.url, timeout=120) as client:
        yield client


def test_external_models_and_chains_are_listed_with_their_kind(client, first):
    kinds = {model.id: model.kind for model in client.models.list()}
    assert kinds == {LOCAL: "local", REMOTE: "external", WRONG_KEY: "external", CHAIN: "fallback"}
    assert client.models.retrieve(REMOTE).kind == "external"
    listed = {model["id"]: model for model in httpx.get(f"{first.url}/models", timeout=10).json()["models"]}
    assert listed[REMOTE]["kind"] == "external" and listed[REMOTE]["name"] == LOCAL
    assert listed[REMOTE]["metadata"]["circuit"] == "closed"
    assert listed[CHAIN]["metadata"]["members"] == [LOCAL, REMOTE]


def test_a_chat_completion_is_served_by_the_provider_with_the_local_answer_shape(client):
    completion = client.chat.completions.create(model=REMOTE, messages=FRANCE, temperature=0)

    assert completion.model == REMOTE and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].message.content == "The capital of France is Paris."  # the provider's own model
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 20 and completion.usage.completion_tokens == 8


def test_a_streamed_chat_matches_the_whole_answer_and_ends_with_usage(client):
    stream = client.chat.completions.create(
        model=REMOTE, messages=FRANCE, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    *answer, usage = list(stream)

    assert "".join(chunk.choices[0].delta.content or "" for chunk in answer) == "The capital of France is Paris."
    assert answer[-1].choices[0].finish_reason == "stop" and usage.usage.completion_tokens == 8
    assert {chunk.model for chunk in answer} == {REMOTE}


def test_a_raw_completion_goes_to_the_providers_completions(client):
    completion = client.completions.create(model=REMOTE, prompt="The capital of France is", temperature=0, stop="\n")

    assert completion.choices[0].text == " Paris." and completion.usage.prompt_tokens == 5


def test_the_bentoml_client_generates_streams_and_decides_through_the_provider(bento_client):
    answer = bento_client.generate(query=FRANCE[0]["content"], model_id=REMOTE, temperature=0)
    events = "".join(bento_client.generate_stream(query=FRANCE[0]["content"], model_id=REMOTE, temperature=0))
    decision = bento_client.classify(
        query="Is Paris the capital of France? Answer yes or no.", labels=["yes", "no"], model_id=REMOTE
    )

    assert answer["result"] == "The capital of France is Paris." and answer["model_id"] == REMOTE
    data = [json.loads(line.removeprefix("data: ")) for line in events.splitlines() if line.startswith("data: ")]
    assert "".join(event.get("text", "") for event in data[:-1]) == answer["result"]
    assert data[-1]["done"] is True and data[-1]["model_id"] == REMOTE
    assert decision["model_id"] == REMOTE and decision["label"] in ("yes", "no")
    assert sum(decision["probabilities"].values()) == pytest.approx(1.0)


def test_loading_or_unloading_an_external_model_or_a_chain_is_a_400(bento_client):
    for operation in (bento_client.load_model, bento_client.unload_model):
        for model_id in (REMOTE, CHAIN):
            with pytest.raises(BentoMLException, match="external_model") as refused:
                operation(model_id=model_id)
            assert refused.value.error_code == 400


def test_the_key_is_read_from_its_variable_and_sent(client, first):
    """REMOTE's key (REMOTE_KEY) is the provider's API key: it answers, as every test above shows;
    WRONG_KEY's variable holds another, which the provider refuses."""
    assert client.chat.completions.create(model=REMOTE, messages=FRANCE, max_tokens=2).model == REMOTE
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=WRONG_KEY, messages=FRANCE, max_tokens=2)

    assert refused.value.status_code == 502
    assert "refused this service's key, from WRONG_REMOTE_KEY (401)" in refused.value.message
    assert value(metrics(first.url), "ai_model_provider_requests_total", provider=WRONG_KEY, outcome="refused") == 1


def test_the_providers_429_is_passed_on_with_its_retry_after(client):
    def ask(_: int) -> openai.RateLimitError | None:
        try:
            client.chat.completions.create(
                model=REMOTE, messages=FRANCE, max_tokens=32, extra_body={"ignore_eos": True}
            )
        except openai.RateLimitError as refused:
            return refused
        return None

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(ask, range(6)))
    refusals = [outcome for outcome in outcomes if outcome is not None]

    assert time.monotonic() - started < 60
    assert 1 <= len(refusals) < len(outcomes)  # the provider serves one at a time and refuses the rest
    for refused in refusals:
        assert int(refused.response.headers["retry-after"]) >= 1
        assert f"the provider of {REMOTE!r} at http://127.0.0.1" in refused.message and "is busy (429)" in refused.message


@dataclass
class LocalHogs:
    """Long generations on the local model, each in a thread; what each ended with is kept."""

    client: openai.OpenAI
    threads: list[threading.Thread] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    def start(self) -> None:
        thread = threading.Thread(target=self._hog)
        thread.start()
        self.threads.append(thread)

    def _hog(self) -> None:
        try:
            self.client.chat.completions.create(
                model=LOCAL, messages=FRANCE, max_tokens=HOG_TOKENS, extra_body={"ignore_eos": True}, timeout=120
            )
            self.ended.append("served")
        except openai.APIError as error:
            self.ended.append(f"{type(error).__name__}: {error}")

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=120)


def metrics(url: str) -> Samples:
    with httpx.Client(base_url=url, timeout=10) as http:
        return scrape(http)


def local_batch(url: str) -> dict[str, int]:
    loaded = httpx.get(f"{url}/health", timeout=10).json()["loaded_models"]
    return next(model for model in loaded if model["id"] == LOCAL)["metadata"]["batch"]


def test_a_fallback_chain_serves_from_the_provider_while_the_local_model_is_over_its_queue_cap(
    client, bento_client, first
):
    hogs = LocalHogs(client)
    try:
        for place in ("running", "waiting"):  # one after the other: the first must hold the batch first
            hogs.start()
            deadline = time.monotonic() + 30
            while not local_batch(first.url)[place]:
                assert time.monotonic() < deadline, f"a long generation never got {place}: {hogs.ended}"
                time.sleep(0.05)
        with pytest.raises(openai.RateLimitError):  # the local model itself refuses more
            client.chat.completions.create(model=LOCAL, messages=FRANCE, max_tokens=4)

        by_chat = client.chat.completions.create(model=CHAIN, messages=FRANCE, max_tokens=4)
        by_stream = list(client.chat.completions.create(model=CHAIN, messages=FRANCE, max_tokens=4, stream=True))
        by_generate = bento_client.generate(query="Name a colour.", model_id=CHAIN, max_length=4)
        busy_batch = local_batch(first.url)
    finally:
        hogs.join()

    assert busy_batch["running"] + busy_batch["waiting"] == 2, "the local model's queue emptied before the chain ran"
    assert hogs.ended == ["served", "served"]
    assert by_chat.model == REMOTE and by_generate["model_id"] == REMOTE
    assert {chunk.model for chunk in by_stream} == {REMOTE}  # every chunk names the member that serves it
    idle = client.chat.completions.create(model=CHAIN, messages=FRANCE, max_tokens=4)
    assert idle.model == LOCAL  # with room, the chain's first member serves
    samples = metrics(first.url)
    assert value(samples, "ai_model_fallbacks_total", chain=CHAIN, model=LOCAL, error_type="overloaded") >= 2


def test_health_and_metrics_show_each_provider(first):
    providers = {entry["model_id"]: entry for entry in httpx.get(f"{first.url}/health", timeout=10).json()["providers"]}
    samples = metrics(first.url)

    assert providers[REMOTE]["circuit"] == "closed" and providers[REMOTE]["retry_in_s"] == 0
    assert value(samples, "ai_model_provider_requests_total", provider=REMOTE, outcome="ok") >= 5
    assert value(samples, "ai_model_provider_requests_total", provider=REMOTE, outcome="rate_limited") >= 1
    assert value(samples, "ai_model_provider_tokens_total", provider=REMOTE, kind="completion") > 0
    assert value(samples, "ai_model_provider_request_seconds_count", provider=REMOTE) >= 5
    assert value(samples, "ai_model_provider_circuit_state", provider=REMOTE) == 0


@dataclass
class Traffic:
    """Requests for the external model one after another, each one's status, Retry-After and seconds kept."""

    client: openai.OpenAI
    outcomes: list[tuple[int, str | None, float]] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stopped.is_set():
            started = time.monotonic()
            try:
                self.client.chat.completions.create(model=REMOTE, messages=FRANCE, max_tokens=8, timeout=60)
                outcome = (200, None)
            except openai.APIStatusError as error:
                outcome = (error.status_code, error.response.headers.get("retry-after"))
            self.outcomes.append((*outcome, time.monotonic() - started))
            time.sleep(0.2)

    def wait_for(self, status: int, after: int, timeout_s: float) -> int:
        """The index of the first outcome with the status at or after `after`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [index for index, (seen, *_) in enumerate(self.outcomes) if index >= after and seen == status]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {status} in {timeout_s}s: {[seen for seen, *_ in self.outcomes[after:]]}")


def test_a_killed_provider_gives_502s_then_an_open_circuit_then_recovers_when_it_restarts(client, first, provider):
    traffic = Traffic(client)
    thread = threading.Thread(target=traffic.run)
    thread.start()
    try:
        traffic.wait_for(200, 0, timeout_s=30)
        killed_at = len(traffic.outcomes)
        provider.kill()
        first_502 = traffic.wait_for(502, killed_at, timeout_s=30)
        first_503 = traffic.wait_for(503, first_502, timeout_s=30)
        health = httpx.get(f"{first.url}/health", timeout=10).json()["providers"]
        gauge = value(metrics(first.url), "ai_model_provider_circuit_state", provider=REMOTE)

        provider.start()  # on the same port
        restarted_at = len(traffic.outcomes)
        recovered = traffic.wait_for(200, restarted_at, timeout_s=COOLDOWN_S + 30)
    finally:
        traffic.stopped.set()
        thread.join(timeout=90)

    statuses = [status for status, *_ in traffic.outcomes]
    assert set(statuses[killed_at:first_503]) <= {200, 502}, statuses  # failures before the circuit opens are 502s
    open_circuit = traffic.outcomes[first_503:restarted_at]
    assert open_circuit and all(status == 503 for status, *_ in open_circuit[:3]), statuses
    for status, retry_after, seconds in open_circuit:
        if status == 503:
            assert 1 <= int(retry_after) <= COOLDOWN_S
            assert seconds < 0.5, f"an open circuit answered in {seconds:.2f}s: it should not call the provider"
    assert next(entry for entry in health if entry["model_id"] == REMOTE)["circuit"] in ("open", "half_open")
    assert gauge >= 1
    assert statuses[recovered] == 200
    after = client.chat.completions.create(model=REMOTE, messages=FRANCE, temperature=0)
    assert after.choices[0].message.content == "The capital of France is Paris."
