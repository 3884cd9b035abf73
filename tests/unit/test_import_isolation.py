"""The domain, the HTTP helpers, the settings and these unit tests import without torch, transformers or bentoml."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "transformers", "bentoml")
UNIT_TEST_MODULES = sorted(f"tests.unit.{path.stem}" for path in Path(__file__).parent.glob("*.py"))


def run_without_heavy_modules(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter where importing torch, transformers or bentoml fails."""
    blocker = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HEAVY_MODULES)
    return subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_blocker_really_blocks() -> None:
    result = run_without_heavy_modules(
        """
        for name in ("torch", "transformers", "bentoml"):
            try:
                __import__(name)
            except ImportError:
                continue
            raise SystemExit(f"{name} imported")
        """
    )

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "module", ["domain", "api.errors", "api.schemas", "api.validation", "api.openai", "api.openai_schemas", "settings", "metrics"]
)
def test_imports_without_torch_transformers_or_bentoml(module: str) -> None:
    result = run_without_heavy_modules(f"import {module}")

    assert result.returncode == 0, result.stderr


def test_the_unit_tests_import_without_torch_transformers_or_bentoml() -> None:
    assert "tests.unit.fakes" in UNIT_TEST_MODULES
    imports = "".join(f"import {module}\n" for module in UNIT_TEST_MODULES)

    result = run_without_heavy_modules(imports)

    assert result.returncode == 0, result.stderr
