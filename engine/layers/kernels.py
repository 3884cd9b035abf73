"""The engine's fp32 CPU kernels (csrc/), built on first use with the local C++ compiler.

- `small_linear`: linear layers at a few rows, where MKL is slow (tuned_linear.py times it against the others).
- `paged_decode_attention`: decoding tokens' attention read in place from the paged KV cache
  (paged_attention.py).
- `rms_norm`, `rotary_embedding_`: a decoder layer's small operations, fused (fused_decoder.py).

Both need AVX2 and FMA. Where the extension cannot be built (no AVX2/FMA, no compiler, no
writable build directory, a failed build) the engine keeps F.linear and SDPA, with one warning.

The build directory is named after the sources' hash and compiles a copy of the sources kept in
it, so a checkout and a Bento with the same kernels share one build wherever their code lies.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.cpp_extension import get_default_build_root, load

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
# bindings.cpp exposes the functions the others define; one extension, one build.
SOURCES = tuple(
    SOURCE_DIR / name
    for name in ("bindings.cpp", "small_linear.cpp", "paged_attention.cpp", "decoder_ops.cpp", "packed_linear.cpp")
)
HEADERS = (SOURCE_DIR / "avx2.h",)  # included by the sources: copied and hashed with them, not compiled
DEFAULT_BUILD_ROOT = Path(__file__).resolve().parents[2] / ".build" / "torch_extensions"
NAME = "engine_kernels"


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_description(cpuinfo: str) -> tuple[str, set[str]]:
    """The CPU's model name and its flags, from /proc/cpuinfo's text."""
    lines = cpuinfo.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    return model, flags


def cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= cpu_description(read_cpuinfo())[1]


def build_roots() -> list[Path]:
    """TORCH_EXTENSIONS_DIR; else the checkout's .build, then torch's per-user cache for code that cannot
    write beside itself (a Bento owned by another user, a read-only image)."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    return [Path(explicit)] if explicit else [DEFAULT_BUILD_ROOT, Path(get_default_build_root())]


def writable_folders(name: str) -> Iterator[Path]:
    """`name` under each build root where it can be made and written, in the roots' order."""
    for root in build_roots():
        folder = root / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):  # torch takes a lock file there even to load a finished build
            yield folder


def kernel_sources() -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (*SOURCES, *HEADERS)}


def sources_digest(sources: dict[str, bytes]) -> str:
    return hashlib.sha256(b"".join(name.encode() + b"\0" + text for name, text in sources.items())).hexdigest()[:12]


def writable_build_dir() -> Path | None:
    """The first build root that can be written, with these sources and torch version's directory in it."""
    sources = kernel_sources()
    for build_dir in writable_folders(f"{NAME}-torch{torch.__version__}-{sources_digest(sources)}"):
        try:
            for file_name, text in sources.items():
                copy = build_dir / file_name
                if not copy.exists():  # written once: a new mtime would make ninja build again
                    partial = build_dir / f"{file_name}.{os.getpid()}.partial"
                    partial.write_bytes(text)
                    partial.replace(copy)
        except OSError:
            continue
        return build_dir
    return None


@functools.cache
def load_kernels() -> ModuleType | None:
    """The compiled extension, built once per source, flags and torch version.

    None, with one logged warning, where it cannot be built.
    """
    if not cpu_has_avx2_fma():
        logger.warning("CPU kernels off: this CPU lacks AVX2 or FMA")
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        logger.warning("CPU kernels off: no C++ compiler %r to build it", compiler)
        return None
    # torch runs `ninja` from PATH; the one pip installs sits next to this interpreter, which may not be on it.
    interpreter_bin = str(Path(sys.executable).parent)
    if interpreter_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([interpreter_bin, os.environ.get("PATH", "")])
    missing = [str(path) for path in (*SOURCES, *HEADERS) if not path.is_file()]
    if missing:  # a Bento built without engine/layers/csrc
        logger.warning("CPU kernels off: their sources %s are missing", ", ".join(missing))
        return None
    build_dir = writable_build_dir()
    if build_dir is None:
        roots = " or ".join(map(str, build_roots()))
        logger.warning("CPU kernels off: no writable build directory in %s", roots)
        return None
    try:
        return load(
            name=NAME,
            sources=[str(build_dir / path.name) for path in SOURCES],
            # -fopenmp so at::parallel_for uses torch's OpenMP threads; the library is torch's own libgomp.
            # CPU_CAPABILITY: ATen's vector types (paged_attention.cpp) in their AVX2 form.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except (RuntimeError, OSError, ImportError) as exc:
        logger.warning("CPU kernels off: building it failed: %s", exc)
        return None
