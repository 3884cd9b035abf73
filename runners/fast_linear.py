"""fp32 linear layers on the CPU for decode batches of a few rows (csrc/small_linear.cpp).

MKL's sgemm is slow for a handful of rows: at 8 rows a step's matrix products cost about twice
those at 1 row, though both read the same weights. The kernel reads each weight once per call
and uses it for every row, so up to MAX_ROWS rows cost little more than one. It is built on
first use with the local C++ compiler; where it cannot be (no AVX2/FMA, no compiler, no writable
build directory, a failed build) layers keep F.linear.

The build directory is named after the source's hash and compiles a copy of the source kept in it,
so a checkout and a Bento with the same kernel share one build wherever their code lies.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import get_default_build_root, load

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "small_linear.cpp"
DEFAULT_BUILD_ROOT = Path(__file__).resolve().parent.parent / ".build" / "torch_extensions"
# Measured with scripts/bench_matmul.py: the kernel takes 0.63x F.linear's time at 8 rows, 0.87x at 24
# and about 1.0x at 32 over SmolLM2-135M's matrices.
MAX_ROWS = 24


def cpu_has_avx2_fma() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return {"avx2", "fma"} <= set(flags)


def build_roots() -> list[Path]:
    """TORCH_EXTENSIONS_DIR; else the checkout's .build, then torch's per-user cache for code that cannot
    write beside itself (a Bento owned by another user, a read-only image)."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    return [Path(explicit)] if explicit else [DEFAULT_BUILD_ROOT, Path(get_default_build_root())]


def writable_build_dir() -> Path | None:
    """The first build root that can be written, with this source and torch version's directory in it."""
    source = SOURCE.read_bytes()
    name = f"small_linear-torch{torch.__version__}-{hashlib.sha256(source).hexdigest()[:12]}"
    for root in build_roots():
        build_dir = root / name
        copy = build_dir / SOURCE.name
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(build_dir, os.W_OK):  # torch takes a lock file there even to load a finished build
                continue
            if not copy.exists():  # written once: a new mtime would make ninja build again
                partial = build_dir / f"{SOURCE.name}.{os.getpid()}.partial"
                partial.write_bytes(source)
                partial.replace(copy)
        except OSError:
            continue
        return build_dir
    return None


@functools.cache
def load_kernel() -> ModuleType | None:
    """The compiled extension, built once per source, flags and torch version.

    None, with one logged warning, where it cannot be built.
    """
    if not cpu_has_avx2_fma():
        logger.warning("small-row linear kernel off: this CPU lacks AVX2 or FMA")
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        logger.warning("small-row linear kernel off: no C++ compiler %r to build it", compiler)
        return None
    # torch runs `ninja` from PATH; the one pip installs sits next to this interpreter, which may not be on it.
    interpreter_bin = str(Path(sys.executable).parent)
    if interpreter_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([interpreter_bin, os.environ.get("PATH", "")])
    if not SOURCE.is_file():  # a Bento built without runners/csrc
        logger.warning("small-row linear kernel off: its source %s is missing", SOURCE)
        return None
    build_dir = writable_build_dir()
    if build_dir is None:
        roots = " or ".join(map(str, build_roots()))
        logger.warning("small-row linear kernel off: no writable build directory in %s", roots)
        return None
    try:
        return load(
            name="small_linear",
            sources=[str(build_dir / SOURCE.name)],
            # -fopenmp so at::parallel_for uses torch's OpenMP threads; the library is torch's own libgomp.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
        )
    except (RuntimeError, OSError, ImportError) as exc:
        logger.warning("small-row linear kernel off: building it failed: %s", exc)
        return None


class SmallBatchLinear(torch.nn.Linear):
    """A Linear whose inference calls with at most MAX_ROWS rows go through the kernel."""

    kernel: ModuleType  # set by accelerate(), once the kernel is built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_features = x.shape[-1]
        rows = x.numel() // in_features if in_features else 0
        if (
            0 < rows <= MAX_ROWS
            and not torch.is_grad_enabled()
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and self.weight.dtype == torch.float32
        ):
            y = self.kernel.small_linear(x.reshape(rows, in_features), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def accelerate(model: torch.nn.Module) -> int:
    """Routes the model's fp32 CPU Linear layers through the kernel for few rows; returns how many it switched.

    The layers keep their parameters (tied ones stay tied): only their class changes.
    """
    layers = [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
        and module.weight.is_contiguous()
    ]
    if not layers:  # a model on a GPU, or in bf16: nothing to build the kernel for
        return 0
    kernel = load_kernel()
    if kernel is None:
        return 0
    SmallBatchLinear.kernel = kernel
    for layer in layers:
        layer.__class__ = SmallBatchLinear
    return len(layers)
