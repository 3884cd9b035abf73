"""Memory: what the engine process uses, what a load may take, and giving memory back."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from domain import InsufficientMemoryError
from metrics import record_memory

from .cgroup import cgroup_memory

GIB = 1024**3
MIB = 1024**2
# Beside its weights a load holds buffers and allocator slack: 1.5% for Qwen2.5-3B in float32, 12%
# for it in int8 (the freed float32 heap not all handed back); BENCHMARKS.md, "Memory".
LOAD_OVERHEAD = 1.05


@dataclass(frozen=True)
class MemoryLimits:
    max_usage_fraction: float
    min_free_gb: float
    gpu_memory_fraction: float


@dataclass(frozen=True)
class SystemMemory:
    total: int
    available: int

    @property
    def used_fraction(self) -> float:
        return 1 - self.available / self.total

    def over(self, limits: MemoryLimits) -> bool:
        return self.used_fraction > limits.max_usage_fraction or self.available < limits.min_free_gb * GIB


def system_memory() -> SystemMemory:
    """The machine's memory, or the process's cgroup's when its limit is lower (psutil sees only the host)."""
    host = psutil.virtual_memory()
    group = cgroup_memory()
    if group is None or group[0] >= host.total:
        return SystemMemory(host.total, host.available)
    limit, working_set = group
    return SystemMemory(limit, min(max(limit - working_set, 0), host.available))


def _mib(value: float) -> float:
    return round(value / MIB, 1)


def gpu_memory() -> list[dict[str, Any]]:
    devices = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        devices.append(
            {
                "device": f"cuda:{index}",
                "allocated_mb": _mib(torch.cuda.memory_allocated(index)),
                "reserved_mb": _mib(torch.cuda.memory_reserved(index)),
                "free_mb": _mib(free),
                "total_mb": _mib(total),
            }
        )
    return devices


def publish_memory_metrics() -> None:
    """The engine's RSS and VMS and, where CUDA exists, each device's allocated and reserved memory, for /metrics."""
    gpu = {
        f"cuda:{index}": (torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index))
        for index in range(torch.cuda.device_count())
    }
    info = psutil.Process().memory_info()
    record_memory(info.rss, info.vms, gpu)


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own heap arena, and freed memory in those arenas
    stays in RSS: load/unload cycles under traffic left RSS up, far less so with 2 arenas
    (BENCHMARKS.md, "Measurements behind rules in the code")."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas)


def trim_heap() -> None:
    """Freed heap pages handed back to the OS: glibc keeps them, so RSS does not fall after a free
    (a load that frees as it goes, calling this now and then, peaks near what it keeps)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_freed_memory() -> dict[str, Any]:
    """Forced garbage collection, accelerator cache clearing, and freed heap handed back to the OS."""
    before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    collected = gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()
    trim_heap()  # without it RSS does not fall after an unload
    after = psutil.Process().memory_info().rss
    return {
        "gc_collected_objects": collected,
        "rss_before_mb": _mib(before),
        "rss_after_mb": _mib(after),
        "freed_mb": _mib(max(before - after, 0)),
        "cuda_cache_cleared": torch.cuda.is_available(),
        "duration_s": round(time.perf_counter() - started, 3),
    }


def process_memory() -> dict[str, Any]:
    process = psutil.Process()
    info = process.memory_info()
    system = system_memory()
    return {
        "rss_mb": _mib(info.rss),
        "vms_mb": _mib(info.vms),
        "percent": round(info.rss / system.total * 100, 2),
        "system_total_mb": _mib(system.total),
        "system_available_mb": _mib(system.available),
        "system_used_percent": round(system.used_fraction * 100, 1),
        "gpu": gpu_memory(),
    }


def system_info(max_workers: int, max_processes: int, cpu_threads: int) -> dict[str, Any]:
    process = psutil.Process()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_percent": psutil.cpu_percent(interval=None),
        "torch_threads": torch.get_num_threads(),
        "cpu_threads_setting": cpu_threads,
        "memory": process_memory(),
        "max_workers": max_workers,
        "max_processes": max_processes,
        "engine_pid": process.pid,
        "engine_threads": threading.active_count(),
        "engine_os_threads": process.num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_version": torch.__version__,
    }


def weights_at_load(metadata: dict[str, Any], bytes_per_parameter: int, files_size: int) -> int:
    parameters = metadata.get("parameters")
    return parameters * bytes_per_parameter if parameters else files_size


def estimate_footprint(weights_bytes: int, kv_cache_bytes: int, transient_bytes: int = 0) -> int:
    """The most a load holds at once: its weights, and either what loading holds beside them for a
    while (`transient_bytes`: the tensor being read, or a mapped weights file) or, after, the KV cache."""
    return int(weights_bytes * LOAD_OVERHEAD) + max(transient_bytes, kv_cache_bytes)


def room_left(device: str, limits: MemoryLimits) -> int:
    """What may still be allocated on `device` (negative when over): on the CPU, within both
    MIN_MEMORY_GB and MAX_MEMORY_USAGE; on CUDA, within the free memory and GPU_MEMORY_FRACTION."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(index)
        return int(min(free, total * limits.gpu_memory_fraction - torch.cuda.memory_reserved(index)))
    system = system_memory()
    above_min_free = system.available - limits.min_free_gb * GIB
    below_max_usage = system.total * limits.max_usage_fraction - (system.total - system.available)
    return int(min(above_min_free, below_max_usage))


def check_room_for(model_id: str, footprint: int, device: str, limits: MemoryLimits) -> None:
    """Refuses a load that would break MIN_MEMORY_GB or MAX_MEMORY_USAGE, before it starts."""
    if device.startswith("cuda"):
        room = room_left(device, limits)
        if footprint > room:
            raise InsufficientMemoryError(
                f"loading {model_id!r} needs about {footprint / GIB:.2f} GB on {device}; "
                f"{max(room, 0) / GIB:.2f} GB is free within GPU_MEMORY_FRACTION={limits.gpu_memory_fraction}"
            )
        return
    system = system_memory()
    left = system.available - footprint
    if left < limits.min_free_gb * GIB:
        raise InsufficientMemoryError(
            f"loading {model_id!r} needs about {footprint / GIB:.2f} GB and would leave {left / GIB:.2f} GB free, "
            f"below MIN_MEMORY_GB={limits.min_free_gb}; unload a model or add memory"
        )
    usage = (system.total - left) / system.total
    if usage > limits.max_usage_fraction:
        raise InsufficientMemoryError(
            f"loading {model_id!r} needs about {footprint / GIB:.2f} GB and would bring memory use to "
            f"{usage:.0%}, above MAX_MEMORY_USAGE={limits.max_usage_fraction}; unload a model or add memory"
        )
