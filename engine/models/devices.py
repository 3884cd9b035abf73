"""Device placement and dtype: `auto` means cuda, then mps, then cpu."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from domain import DeviceNotAvailableError, InvalidRequestError
from settings import DEVICE_NAMES, DEVICE_PATTERN

from ..layers.kernels import cpu_description, read_cpuinfo
from .cgroup import cgroup_cpu_limit

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


# CPU flags of instructions that compute bf16 products natively; without them oneDNN emulates bf16
# in fp32 and it runs several times slower than fp32 itself.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_computes_bf16() -> bool:
    return bool(NATIVE_BF16_FLAGS & cpu_description(read_cpuinfo())[1])


def stored_dtype(model_dir: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's config says its weights are in, where it says one this knows."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return DTYPES.get(name) if isinstance(name, str) else None


def dtype_for(device: str, setting: str, stored: torch.dtype | None = None) -> torch.dtype:
    """MODEL_DTYPE's dtype; `auto` is bf16 on accelerators, and on the CPU fp32, except a bf16
    checkpoint (`stored`) where the CPU computes bf16 natively. There bf16 is faster than fp32
    (Qwen2.5-3B's shape: prefill 3.5x, decode 1.35-1.6x; BENCHMARKS.md, "Memory") and halves the
    memory, and fp32 would not make the weights any more exact. An fp32 checkpoint stays fp32: on
    the bundled SmolLM2, bf16 changes 12% of greedy answers (BENCHMARKS.md, "int8 or bf16")."""
    if setting != "auto":
        return DTYPES[setting]
    if device != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if stored == torch.bfloat16 and cpu_computes_bf16() else torch.float32


def usable_cpus() -> int:
    """The cores this process may run on, and, in a container with a CPU quota, the quota's CPUs
    (rounded up): four threads under `limits.cpu: 2` are throttled in turns at every barrier."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


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
