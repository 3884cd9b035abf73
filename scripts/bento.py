"""Builds the Bento and writes its container's Dockerfile, both offline (`make bento`, `make dockerfile`).

    python scripts/bento.py build                                   # prints the new Bento's tag
    python scripts/bento.py dockerfile [--bento TAG] [--out PATH]   # prints the Dockerfile's path

Both work in BENTOML_HOME. The Dockerfile is the one `bentoml containerize TAG` builds the image
from; writing it needs no Docker engine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import bentoml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENTO = "ai-model:latest"
DEFAULT_DOCKERFILE = ROOT / "build" / "Dockerfile"


def build() -> str:
    bento = bentoml.bentos.build_bentofile(str(ROOT / "bentofile.yaml"), build_ctx=str(ROOT))
    return str(bento.tag)


def write_dockerfile(bento_tag: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        bentoml.container.get_containerfile(bento_tag, output_path=str(out))
    except bentoml.exceptions.NotFound:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        sys.exit(f"no Bento {bento_tag} in BENTOML_HOME={home}: build one with `make bento`")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the Bento from bentofile.yaml and print its tag")
    dockerfile = commands.add_parser("dockerfile", help="write the container's Dockerfile and print its path")
    dockerfile.add_argument("--bento", default=DEFAULT_BENTO, help=f"the Bento's tag (default {DEFAULT_BENTO})")
    dockerfile.add_argument("--out", type=Path, default=DEFAULT_DOCKERFILE, help="the file to write (%(default)s)")
    args = parser.parse_args()
    print(build() if args.command == "build" else write_dockerfile(args.bento, args.out))


if __name__ == "__main__":
    main()
