"""Import boundaries. The domain, the HTTP helpers, the settings, the engine's scheduling core and
these unit tests import without torch, transformers or bentoml; the whole API process imports
without torch or transformers (they belong to the engine process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY_MODULES = ("torch", "transformers", "bentoml")
ENGINE_ONLY_MODULES = ("torch", "transformers")
UNIT_TEST_MODULES = sorted(f"tests.unit.{path.stem}" for path in Path(__file__).parent.glob("*.py"))


def run_without_heavy_modules(code: str, blocked: tuple[str, ...] = HEAVY_MODULES) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter where importing any of `blocked` fails."""
    blocker = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
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
    "module",
    [
        "domain", "api.errors", "api.schemas", "api.validation", "api.openai", "api.openai_schemas", "api.openai_answers",
        "api.batch", "settings", "metrics", "engine.core.sequence", "engine.core.block_manager", "engine.core.scheduler",
        "engine.core.engine_core", "engine.core.label_scoring",
        "engine.core.loop_bridge", "adapters.engine_client", "adapters.response_cache", "adapters.drain",
        "api.auth", "adapters.providers", "adapters.providers_file", "adapters.model_router", "adapters.circuit_breaker",
        "engine.core.queue_board", "engine.models.cpu_threads",
    ],
)  # fmt: skip
def test_imports_without_torch_transformers_or_bentoml(module: str) -> None:
    result = run_without_heavy_modules(f"import {module}")

    assert result.returncode == 0, result.stderr


def test_the_api_process_imports_without_torch_or_transformers() -> None:
    """service.py is what each API worker imports: its adapters, and the engine service class that
    `bentoml.depends` names, must leave torch and transformers to the engine process."""
    result = run_without_heavy_modules(
        """
        import sys
        import service
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("engine", "adapters", "api"))
        assert "engine.service" in loaded and "adapters.engine_client" in loaded, loaded
        """,
        blocked=ENGINE_ONLY_MODULES,
    )

    assert result.returncode == 0, result.stderr


def test_the_unit_tests_import_without_torch_transformers_or_bentoml() -> None:
    assert "tests.unit.fakes" in UNIT_TEST_MODULES
    imports = "".join(f"import {module}\n" for module in UNIT_TEST_MODULES)

    result = run_without_heavy_modules(imports)

    assert result.returncode == 0, result.stderr
