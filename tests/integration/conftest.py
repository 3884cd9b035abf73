from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runners.repository import TransformersModelRepository
from tests.conftest import ROOT

from .support import ROOMY, TINY_QWEN_ID, DirectoryCatalog


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / TINY_QWEN_ID
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_test_model.py"), "--out", str(out)], check=True, capture_output=True
    )
    return out


@pytest.fixture(scope="session")
def executor():
    with ThreadPoolExecutor(4, thread_name_prefix="test-engine") as pool:
        yield pool


@pytest.fixture
def repository(tiny_qwen_dir, executor) -> TransformersModelRepository:
    return TransformersModelRepository(DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir}), executor, ROOMY)
