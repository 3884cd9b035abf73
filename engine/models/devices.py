"""Device placement and dtype: `auto` means cuda, then mps, then cpu."""

from __future__ import annotations

import os

import torch

from domain import DeviceNotAvailableError, InvalidRequestError
from settings import DEVICE_NAMES, DEVICE_PATTERN

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def available_devices() -> list[str]:
    devices = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if mps_available():
        devices.append("mps")
    return devices + ["cpu"]


def resolve_device(requested: str) -> str:
    """The concrete device for a request; a known name whose hardware is absent is DeviceNotAvailableError."""
    device = requested.strip().lower()
    if not DEVICE_PATTERN.match(device):
        raise InvalidRequestError(f"device: must be one of {DEVICE_NAMES}, got {requested!r}")
    if device == "auto":
        return available_devices()[0]
    if device == "cuda":
        device = "cuda:0"
    if device not in available_devices():
        raise DeviceNotAvailableError(
            f"device {requested!r} is not available on this machine (available: {', '.join(available_devices())})"
        )
    return device


def dtype_for(device: str, setting: str) -> torch.dtype:
    """fp32 on the CPU (CPUs without bf16 matrix units run bf16 several times slower); bf16 on accelerators."""
    if setting != "auto":
        return DTYPES[setting]
    return torch.float32 if device == "cpu" else torch.bfloat16


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_torch(cpu_threads: int, gpu_memory_fraction: float) -> int:
    """Applies CPU_THREADS, at most one thread per usable core: more threads than cores make every
    matrix product wait on the others (BENCHMARKS.md, "Settings measured for the defaults").
    Returns the thread count used."""
    threads = min(cpu_threads, usable_cpus())
    torch.set_num_threads(threads)
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction, index)
    if torch.cuda.is_available():
        # cuDNN's attention spends milliseconds of CPU on each masked decode call, more than the step's
        # GPU work at a 3B model's size (BENCHMARKS.md, "GPU").
        torch.backends.cuda.enable_cudnn_sdp(False)
    return threads


# The engine's batches are throughput work; the API workers' admission, validation and 429s are
# latency work that needs a sliver of CPU at once. With the engine at nice 5 against the API's 0,
# the kernel gives the API about 3x the engine's share whenever both want the same core.
ENGINE_NICENESS = 5


def yield_cpu_to_api_workers(niceness: int = ENGINE_NICENESS) -> None:
    """Lowers this process's priority: every existing thread (Linux niceness is per thread) and,
    through inheritance, every thread started later. Lowering needs no privilege."""
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for task in tasks:
        try:
            os.setpriority(os.PRIO_PROCESS, int(task), max(niceness, os.getpriority(os.PRIO_PROCESS, int(task))))
        except (ProcessLookupError, PermissionError):  # a thread that ended meanwhile; a sandbox without the call
            pass
