"""scripts/import_model.py against a throw-away model store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "import_model.py")


def import_model(store, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(store)}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300)


def stored_models(store) -> list[dict]:
    env = {**os.environ, "BENTOML_HOME": str(store)}
    bentoml = os.path.join(os.path.dirname(sys.executable), "bentoml")
    listing = subprocess.run([bentoml, "models", "list", "-o", "json"], env=env, capture_output=True, text=True, check=True)
    return json.loads(listing.stdout)


def test_hf_directory_imports_with_metadata_and_only_once(tmp_path, tiny_qwen_dir):
    store = tmp_path / "home"
    first = import_model(store, "--from", str(tiny_qwen_dir), "--name", "qwen-model_full")
    assert first.returncode == 0, first.stderr
    assert "imported qwen-model_full:" in first.stdout and "Qwen2ForCausalLM" in first.stdout

    again = import_model(store, "--from", str(tiny_qwen_dir), "--name", "qwen-model_full")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert len(stored_models(store)) == 1

    env = {**os.environ, "BENTOML_HOME": str(store)}
    probe = "import bentoml, json; print(json.dumps(bentoml.models.get('qwen-model_full').info.metadata))"
    metadata = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout)
    assert metadata["architecture"] == "Qwen2ForCausalLM"
    assert metadata["context_length"] == 32768
    assert 3_000_000 < metadata["parameters"] < 4_000_000
    assert metadata["dtype"] == "float32"
    assert metadata["source"] == str(tiny_qwen_dir)


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda path: path / "missing", "does not exist"),
        (lambda path: path, "no config.json"),
        (lambda path: (path / "config.json").write_text("{broken") and path, "not valid JSON"),
        (lambda path: (path / "config.json").write_text("{}") and path, "has no weights"),
        (lambda path: (path / "notes.txt").write_text("x") and path / "notes.txt", "not a .gguf file"),
    ],
)
def test_broken_sources_are_refused_with_a_clear_message(tmp_path, make_source, message):
    source = make_source(_empty_dir(tmp_path / "source"))
    result = import_model(tmp_path / "home", "--from", str(source), "--name", "broken")
    assert result.returncode == 2
    assert message in result.stderr


def _empty_dir(path):
    path.mkdir()
    return path


def test_from_needs_a_name(tmp_path):
    result = import_model(tmp_path / "home", "--from", str(tmp_path))
    assert result.returncode == 2 and "--name is required" in result.stderr
