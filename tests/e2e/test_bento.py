"""The Bento as `make bento` builds it, served by its tag away from the checkout, and its container's Dockerfile.

Everything here runs in a temporary BENTOML_HOME whose store holds only the default model (hard
links into the project's store, so seeding costs nothing): the project's store gets no Bento, and
the served Bento can reach no model but the one it references.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import bentoml
import httpx
import pytest

from engine.layers.kernels import build_roots, cpu_has_avx2_fma
from settings import Settings, get_settings
from tests.conftest import ROOT

from .server import BENTOML, start

pytestmark = pytest.mark.slow
BENTO_SCRIPT = ROOT / "scripts" / "bento.py"
# The specification's ten variables: the image must carry them at settings.py's defaults.
SPEC_VARIABLES = [
    "DEVICE_TYPE", "CPU_THREADS", "GPU_MEMORY_FRACTION", "MAX_WORKERS", "MAX_PROCESSES",
    "MAX_GENERATION_TIME", "MAX_NEW_TOKENS", "GENERATION_TEMPERATURE", "MAX_MEMORY_USAGE", "MIN_MEMORY_GB",
]  # fmt: skip


def link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem
        shutil.copy2(source, destination)


@pytest.fixture(scope="module", autouse=True)
def bento_home(tmp_path_factory) -> Iterator[Path]:
    """BENTOML_HOME for this module's commands: a store with the default model and nothing else."""
    home = tmp_path_factory.mktemp("bentoml-home")
    model = bentoml.models.get(get_settings().default_model_id)
    # The store keeps a model as models/<name>/<version>/ beside a `latest` file: copy the name's folder.
    shutil.copytree(Path(model.path).parent, home / "models" / model.tag.name, copy_function=link_or_copy)
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("BENTOML_HOME", str(home))
        # The checkout on PYTHONPATH (the Makefile exports it) would stand in for a module the Bento lacks.
        environment.delenv("PYTHONPATH", raising=False)
        yield home


def run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stderr[-4000:]}"
    return done.stdout.strip()


@pytest.fixture(scope="module")
def bento_tag() -> str:
    return run(sys.executable, str(BENTO_SCRIPT), "build").splitlines()[-1]


@pytest.fixture(scope="module")
def bento_dir(bento_tag) -> Path:
    return Path(run(BENTOML, "get", bento_tag, "-o", "path"))


def test_make_bento_prints_the_tag_of_a_bento_that_packs_the_default_model(bento_tag):
    assert re.fullmatch(r"ai-model:[a-z0-9]+", bento_tag)
    info = json.loads(run(BENTOML, "get", bento_tag, "-o", "json"))
    engine = next(service for service in info["services"] if service["name"] == "generation-engine")
    assert [model["tag"].split(":")[0] for model in engine["models"]] == [get_settings().default_model_id]


def test_the_bento_serves_by_its_tag_from_another_directory(bento_tag, bento_home, tmp_path):
    # The kernels `make setup` built for the checkout: the same sources, so the Bento loads them without compiling.
    kernel_builds = {"TORCH_EXTENSIONS_DIR": str(build_roots()[0])}
    service = start(tmp_path / "bento.log", kernel_builds, target=bento_tag, cwd=tmp_path)
    try:
        answer = httpx.post(
            f"{service.url}/generate", json={"query": "What is the capital of France?", "temperature": 0}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert "Paris" in answer.json()["result"]
        models = httpx.get(f"{service.url}/models", timeout=10).json()["models"]
        assert [Path(model["path"]).resolve().is_relative_to(bento_home) for model in models] == [True]
    finally:
        service.stop()
    # Without AVX2 the kernels are off with one warning; otherwise the Bento's engine loads them.
    assert service.logs().count("CPU kernels off") == (0 if cpu_has_avx2_fma() else 1), service.logs()


def test_make_dockerfile_writes_an_image_that_installs_the_requirements_and_serves(bento_tag, bento_dir, tmp_path):
    out = tmp_path / "docker" / "Dockerfile"
    assert run(sys.executable, str(BENTO_SCRIPT), "dockerfile", "--bento", bento_tag, "--out", str(out)) == str(out)
    dockerfile = out.read_text()
    variables = dict(re.findall(r"^ARG (\w+)=(.*)$", dockerfile, flags=re.MULTILINE))

    for name in SPEC_VARIABLES:
        default = Settings.model_fields[name.lower()].default
        assert type(default)(variables[name]) == default, name
    assert variables["HOST"] == "0.0.0.0"
    assert f"\nEXPOSE {variables['PORT']}\n" in dockerfile
    assert variables["UV_TORCH_BACKEND"] == "cpu"
    # The torch build is chosen before the install, and the code comes in after it.
    install = dockerfile.index("pip install -r $BENTO_PATH/env/python/requirements.txt")
    assert dockerfile.index("ENV UV_TORCH_BACKEND=$UV_TORCH_BACKEND") < install
    assert install < dockerfile.index("COPY --chown=bentoml:bentoml . ./")
    project_requirements = {line for line in (ROOT / "requirements.txt").read_text().splitlines() if line}
    assert project_requirements <= set((bento_dir / "env" / "python" / "requirements.txt").read_text().splitlines())
    # With no arguments, the image's entrypoint serves the Bento it holds.
    assert 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]' in dockerfile
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in (bento_dir / "env" / "docker" / "entrypoint.sh").read_text()
