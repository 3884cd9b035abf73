"""`make bento` as a user runs it: in the project's own BentoML home, which lies inside the build
context, twice in a row, each Bento holding exactly the service's code."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

from .server import BENTOML

pytestmark = pytest.mark.slow
DEFAULT_HOME = ROOT / ".bentoml"  # the Makefile's BENTOML_HOME
KERNEL_SOURCES = ("engine/layers/csrc/",)
OPERATOR_TOOLS = ("scripts/import_model.py",)


def in_default_home(*command: str) -> str:
    environment = {**os.environ, "BENTOML_HOME": str(DEFAULT_HOME)}
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout.strip()


def intended_files() -> set[str]:
    """The service's code: every tracked Python module outside tests/ and scripts/, the kernels'
    sources, the operator's import tool; and the bentofile BentoML writes beside them."""
    tracked = in_default_home("git", "ls-files").splitlines()
    code = {
        path
        for path in tracked
        if (path.endswith(".py") and not path.startswith(("tests/", "scripts/")))
        or path.startswith(KERNEL_SOURCES)
        or path in OPERATOR_TOOLS
    }
    return code | {"bentofile.yaml"}


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def bento_tags() -> Iterator[list[str]]:
    """Two Bentos built one after the other by `make bento`; deleted afterwards."""
    tags: list[str] = []
    try:
        for _ in range(2):
            tags.append(in_default_home("make", "--no-print-directory", "bento").splitlines()[-1])
        yield tags
    finally:
        for tag in tags:
            in_default_home(BENTOML, "delete", tag, "--yes")


def test_make_bento_run_twice_in_one_checkout_builds_two_bentos(bento_tags):
    assert len(set(bento_tags)) == 2 and all(tag.startswith("ai-model:") for tag in bento_tags)


def test_each_bento_holds_exactly_the_services_code(bento_tags):
    expected = intended_files()
    for tag in bento_tags:
        source = Path(in_default_home(BENTOML, "get", tag, "-o", "path")) / "src"
        assert files_under(source) == expected, tag
