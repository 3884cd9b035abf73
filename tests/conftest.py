"""Shared test set-up: a project-local model store, no tracking, no model hub."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("BENTOML_HOME", str(ROOT / ".bentoml"))
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A random-weight tiny Qwen2 model directory with the bundled ChatML tokenizer."""
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_test_model.py"), "--out", str(out)], check=True, capture_output=True
    )
    return out


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The chaos tests run last: they load every core on purpose, and their first burst measures the
    service on a machine that has settled (on a fresh CI machine the set-up's writes are still being
    flushed while the first tests run)."""
    items.sort(key=lambda item: item.get_closest_marker("chaos") is not None)
