"""The full fuzz run: schemathesis drives every route of ours, the OpenAI-compatible ones on /v1 and
BentoML's task routes included, on a fresh `bentoml serve` with 500 generated cases per operation and
generation mode (the test suite runs 25), checking for server errors and for answers /docs.json does
not document (status, content type, headers, body), that every schema-violating request is refused,
and that no route refuses every request its document calls valid (schemathesis' "schema validation
mismatch"). schemathesis.toml shapes the generated requests.

    python scripts/fuzz.py [--examples 500]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=500, help="generated cases per operation and mode")
    args = parser.parse_args()
    env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples)}
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "e2e" / "test_fuzz.py"), "-v"]
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
