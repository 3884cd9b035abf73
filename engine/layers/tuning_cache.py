"""The linear layers' plans (tuned_linear.py), kept on disk per host so a restart times nothing again.

A plan holds for one host: the key names the CPU model, the instruction sets that decide which
code paths MKL, oneDNN and the engine's kernels take, the thread count, the torch version, the
engine kernels' sources and the row buckets a plan has a kernel for. Any change gives a new key,
and the layers are timed again. A folder that
cannot be written costs only that: the layers are timed at every load, and the service serves.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .kernels import cpu_description, kernel_sources, read_cpuinfo, sources_digest, writable_folders
from .tuned_linear import ROW_BUCKETS, Kernel, Plan

logger = logging.getLogger(__name__)

FILE_NAME = "linear-plans.json"
# The flags that change which code a matrix product runs.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def host_key(threads: int, cpuinfo: str | None = None) -> str:
    model, flags = cpu_description(read_cpuinfo() if cpuinfo is None else cpuinfo)
    isa = " ".join(flag for flag in ISA_FLAGS if flag in flags) or "no-simd-flags"
    buckets = ",".join(bucket.name for bucket in ROW_BUCKETS)
    return (
        f"{model} | {isa} | {threads} threads | torch {torch.__version__} | kernels {sources_digest(kernel_sources())}"
        f" | rows {buckets}"
    )


def default_folder() -> Path | None:
    """The first of the kernels' build roots that can be written: a per-host cache, like their builds."""
    return next(writable_folders("kernel-tuning"), None)


class TuningCache:
    def __init__(self, folder: Path | None, key: str) -> None:
        self.folder = folder
        self.key = key

    @property
    def _path(self) -> Path | None:
        return None if self.folder is None else self.folder / FILE_NAME

    def _read_all(self) -> dict:
        try:
            return json.loads(self._path.read_text())
        except (OSError, ValueError, AttributeError):  # no file yet, a damaged one, or no folder
            return {}

    def load(self) -> dict[str, Plan]:
        stored = self._read_all().get(self.key, {})
        try:
            return {shape: tuple(Kernel(name) for name in plan) for shape, plan in stored.items()}
        except ValueError:  # a kernel this version does not know: time again
            return {}

    def save(self, plans: dict[str, Plan]) -> bool:
        """Writes this host's plans beside other hosts'; False (with a warning) where it cannot."""
        if self._path is None:
            logger.warning("no writable folder for the linear layers' plans: they are timed at every load")
            return False
        every_host = self._read_all()
        every_host[self.key] = {shape: [kernel.value for kernel in plan] for shape, plan in plans.items()}
        partial = self._path.with_name(f"{FILE_NAME}.{os.getpid()}.partial")
        try:
            partial.write_text(json.dumps(every_host, indent=1, sort_keys=True))
            partial.replace(self._path)
        except OSError as error:
            logger.warning("cannot keep the linear layers' plans in %s (%s): they are timed at every load", self.folder, error)
            return False
        return True
