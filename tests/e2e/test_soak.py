"""A short soak through scripts/soak.py against its own server: no 5xx, no transport errors, every
invalid body a 4xx, and RSS flat (under 5%) from request 200 to the end, across a model reload."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

from .server import start


def test_a_short_soak_passes_its_verdict(tmp_path):
    service = start(tmp_path / "soak.log", {"RESPONSE_CACHE_SIZE": "0"})  # as scripts/soak.py starts it
    try:
        soak = subprocess.run(
            [sys.executable, "scripts/soak.py", "--url", service.url, "--requests", "400", "--flip-every", "300"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
    finally:
        service.stop()
    assert soak.returncode == 0, soak.stdout[-3000:] + soak.stderr[-2000:]
    assert "verdict: PASS" in soak.stdout
