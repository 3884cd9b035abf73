"""The providers file: external models with their defaults, fallback chains, and a start-up error that
names the file, the entry and the value for each way it can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.providers_file import read_providers_file
from settings import ConfigurationError

LOCAL_IDS = ("smollm2-135m-instruct", "qwen-model_full")
ENVIRON = {"REMOTE_KEY": "sk-secret"}
REMOTE = {"model_id": "remote", "base_url": "http://provider:8003/v1/", "model": "their-model", "api_key_env": "REMOTE_KEY"}
YAML = """
models:
  - model_id: remote
    base_url: http://provider:8003/v1/
    model: their-model
    api_key_env: REMOTE_KEY
    timeout_s: 20
    max_retries: 1
    max_concurrency: 4
    circuit_breaker: {failure_threshold: 2, cooldown_s: 5}
fallbacks:
  qwen-or-remote: [qwen-model_full, remote]
"""


def written(tmp_path: Path, content: object, name: str = "providers.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def refusal(path: Path, environ: dict[str, str] = ENVIRON) -> str:
    with pytest.raises(ConfigurationError) as raised:
        read_providers_file(path, LOCAL_IDS, environ)
    return str(raised.value)


def test_a_yaml_file_gives_its_models_and_chains(tmp_path: Path) -> None:
    providers = read_providers_file(written(tmp_path, YAML, "providers.yaml"), LOCAL_IDS, ENVIRON)

    [remote] = providers.models
    assert (remote.model_id, remote.base_url, remote.model) == ("remote", "http://provider:8003/v1", "their-model")
    assert (remote.timeout_s, remote.max_retries, remote.max_concurrency) == (20, 1, 4)
    assert (remote.circuit_breaker.failure_threshold, remote.circuit_breaker.cooldown_s) == (2, 5)
    assert providers.chains == {"qwen-or-remote": ("qwen-model_full", "remote")}


def test_a_json_file_takes_the_defaults_for_what_it_leaves_out(tmp_path: Path) -> None:
    [remote] = read_providers_file(written(tmp_path, {"models": [REMOTE]}), LOCAL_IDS, ENVIRON).models

    assert (remote.timeout_s, remote.connect_timeout_s, remote.max_retries) == (60.0, 5.0, 2)
    assert (remote.max_concurrency, remote.queue_timeout_s) == (16, 5.0)
    assert (remote.circuit_breaker.failure_threshold, remote.circuit_breaker.cooldown_s) == (5, 30.0)


def test_an_empty_file_declares_nothing(tmp_path: Path) -> None:
    providers = read_providers_file(written(tmp_path, "", "providers.yaml"), LOCAL_IDS, ENVIRON)

    assert providers.models == [] and providers.chains == {}


MODELS = {"models": [REMOTE]}
MISTAKES = [
    pytest.param(
        {"models": [{**REMOTE, "base_url": "ftp://x"}]},
        "models.0.base_url: must be an http:// or https:// URL, got 'ftp://x'",
        id="url",
    ),
    pytest.param({"models": [{**REMOTE, "api_key": "sk-inline"}]}, "models.0.api_key: unknown field", id="inline-key"),
    pytest.param(
        {"models": [{**REMOTE, "model_id": "Remote Model"}]}, "models.0.model_id: String should match pattern", id="id"
    ),
    pytest.param(
        {"models": [{**REMOTE, "max_concurrency": 0}]},
        "models.0.max_concurrency: Input should be greater than or equal to 1, got 0",
        id="concurrency",
    ),
    pytest.param(
        {"models": [{**REMOTE, "model_id": "qwen-model_full"}]},
        "models.0.model_id: 'qwen-model_full' is also a model in the store",
        id="store-id",
    ),
    pytest.param({"models": [REMOTE, REMOTE]}, "models.1.model_id: 'remote' is declared twice", id="twice"),
    pytest.param(
        {**MODELS, "fallbacks": {"c": ["qwen-model_full", "nope"]}},
        "fallbacks.c.1: 'nope' is no model (models: qwen-model_full, remote, smollm2-135m-instruct)",
        id="unknown-member",
    ),
    pytest.param(
        {**MODELS, "fallbacks": {"remote": ["qwen-model_full", "remote"]}},
        "fallbacks.remote: the chain's id is already a model's id",
        id="chain-id",
    ),
    pytest.param(
        {**MODELS, "fallbacks": {"a": ["remote", "b"], "b": ["remote", "a"]}},
        "fallbacks.a.1: 'b' is a fallback chain; a chain's members are models",
        id="cycle",
    ),
    pytest.param(
        {**MODELS, "fallbacks": {"c": ["remote", "remote"]}},
        "fallbacks.c.1: 'remote' is named twice in the chain",
        id="member-twice",
    ),
    pytest.param(
        {"fallbacks": {"c": ["qwen-model_full"]}},
        "fallbacks.c: List should have at least 2 items after validation",
        id="one-member",
    ),
]


@pytest.mark.parametrize("content, message", MISTAKES)
def test_each_mistake_stops_the_start_naming_the_file_the_entry_and_the_value(tmp_path: Path, content, message) -> None:
    path = written(tmp_path, content)

    found = refusal(path)

    assert found.startswith(f"invalid configuration: PROVIDERS_FILE={str(path)!r}: ")
    assert message in found


def test_a_key_variable_that_is_not_set_stops_the_start(tmp_path: Path) -> None:
    found = refusal(written(tmp_path, {"models": [REMOTE]}), environ={})

    assert "models.0.api_key_env: the environment variable REMOTE_KEY that holds 'remote''s key is not set" in found


def test_a_file_that_cannot_be_read_or_parsed_stops_the_start(tmp_path: Path) -> None:
    assert "cannot be read (No such file or directory)" in refusal(tmp_path / "missing.yaml")
    assert "not valid YAML" in refusal(written(tmp_path, "models: [", "bad.yaml"))
    assert "not valid JSON" in refusal(written(tmp_path, "{", "bad.json"))
