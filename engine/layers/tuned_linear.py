"""fp32 linear layers on the CPU, each row count served by the implementation that is fastest on this host.

Which way of computing `x @ W.T` is fastest depends on the CPU, the shape and the number of rows, and
no fixed choice holds across hosts: MKL takes a generic path on some CPUs, oneDNN's packed weights
win at many rows on one host and lose on another, the engine's own small-row kernel wins at a
decode step's few rows where MKL is slow. So at load the engine times every candidate on the
model's own weights, for every shape and every bucket of row counts a step can have, and each layer
then dispatches on its input's row count. The choice is cached on disk under a key of the CPU, its
instruction sets, the thread count and the torch version (tuning_cache.py), so a restart on the
same host does not time anything again.

Candidates: MKL (`F.linear`), oneDNN with the weight packed once, `torch.mm` on a transposed copy,
and, where the engine's kernels are built, the small-row kernel (csrc/small_linear.cpp, AVX2) and,
on a CPU with AVX-512, the packed kernel (csrc/packed_linear.cpp) on the weight packed into panels.
A copy or a packed weight is kept only for a layer whose plan uses it, and it counts in the
model's memory.
"""

from __future__ import annotations

import enum
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from .kernels import cpu_description, read_cpuinfo

logger = logging.getLogger(__name__)


class Kernel(str, enum.Enum):
    MKL = "mkl"  # F.linear
    ONEDNN = "onednn"  # oneDNN's inner product on a weight packed once
    TRANSPOSED = "transposed"  # torch.mm on a contiguous [in, out] copy
    SMALL_ROWS = "small_rows"  # the engine's AVX2 kernel (csrc/small_linear.cpp)
    AVX512_PACKED = "avx512_packed"  # the engine's AVX-512 kernel on packed panels (csrc/packed_linear.cpp)

    @property
    def copies_weight(self) -> bool:
        return self in (Kernel.ONEDNN, Kernel.TRANSPOSED, Kernel.AVX512_PACKED)


@dataclass(frozen=True)
class RowBucket:
    low: int
    high: int | None  # inclusive; None: no end
    timed_rows: int  # the row count timed for the whole bucket

    def holds(self, rows: int) -> bool:
        return self.low <= rows and (self.high is None or rows <= self.high)

    @property
    def name(self) -> str:
        if self.high is None:
            return f"{self.low}+"
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


# A decode step has as many rows as decoding sequences (up to MAX_BATCH_SIZE, 32 by default); a
# step with prompt chunks has up to PREFILL_TOKEN_BUDGET more.
ROW_BUCKETS = (
    RowBucket(1, 1, 1),
    RowBucket(2, 8, 8),
    RowBucket(9, 24, 16),
    RowBucket(25, 48, 32),
    RowBucket(49, 128, 64),
    RowBucket(129, None, 256),
)
BUCKET_OF_ROWS = [0, *(next(i for i, b in enumerate(ROW_BUCKETS) if b.holds(rows)) for rows in range(1, 129))]
LAST_BUCKET = len(ROW_BUCKETS) - 1
# A kernel that needs its own copy of the weight must beat the best one that does not by this much.
COPY_MARGIN = 0.9
# Timing runs over this many bytes of the shape's weights at least, more than a CPU's last-level
# cache holds: in a model each weight is read from memory, not from cache.
TIMED_BYTES = 96 << 20


def bucket_of(rows: int) -> int:
    return BUCKET_OF_ROWS[rows] if rows < len(BUCKET_OF_ROWS) else LAST_BUCKET


Plan = tuple[Kernel, ...]  # one kernel per row bucket


def shape_key(weight: torch.Tensor) -> str:
    return f"{weight.shape[0]}x{weight.shape[1]}"


class TunedLinear(torch.nn.Linear):
    """A Linear whose inference calls go to the kernel its plan names for their row count."""

    plan: Plan
    kernels: ModuleType | None  # the engine's built kernels, when a plan uses them
    copies: dict[Kernel, torch.Tensor]  # the weight in each layout its plan's kernels read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features if self.in_features else 0
        kernel = self.plan[bucket_of(rows)] if rows else Kernel.MKL
        if kernel is Kernel.MKL:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        y = run_kernel(kernel, flat, self.weight, self.bias, self.copies.get(kernel), self.kernels)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        plan = ", ".join(f"{bucket.name}: {kernel.value}" for bucket, kernel in zip(ROW_BUCKETS, self.plan))
        return f"{super().extra_repr()}, plan=({plan})"


def run_kernel(
    kernel: Kernel,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    copy: torch.Tensor | None,
    kernels: ModuleType | None,
) -> torch.Tensor:
    """x: [rows, in] contiguous fp32 -> [rows, out]; `copy` is weight_copy(kernel, weight, kernels)."""
    if kernel is Kernel.ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(x, copy, bias, "none", [], "")
    if kernel is Kernel.TRANSPOSED:
        return torch.addmm(bias, x, copy) if bias is not None else torch.mm(x, copy)
    if kernel is Kernel.SMALL_ROWS:
        return kernels.small_linear(x.contiguous(), weight, bias)
    if kernel is Kernel.AVX512_PACKED:
        return kernels.packed_linear(x, copy, bias, weight.shape[0])
    return F.linear(x, weight, bias)


def weight_copy(kernel: Kernel, weight: torch.Tensor, kernels: ModuleType | None) -> torch.Tensor:
    """The weight in the layout a kernel that copies it reads."""
    weight = weight.detach()
    if kernel is Kernel.ONEDNN:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    if kernel is Kernel.TRANSPOSED:
        return weight.t().contiguous()  # [in, out]
    if kernel is Kernel.AVX512_PACKED:
        return kernels.pack_linear_weight(weight)
    raise ValueError(f"{kernel.value} reads the weight as it is")


class Choice(str, enum.Enum):
    """LINEAR_KERNELS: which kernels may serve the fp32 CPU linear layers."""

    TUNED = "tuned"  # every candidate, weight copies where they win
    IN_PLACE = "in_place"  # the candidates that use the weights as they are: no extra memory
    MKL = "mkl"  # F.linear everywhere, nothing timed


def candidates(kernels: ModuleType | None, choice: Choice = Choice.TUNED) -> list[Kernel]:
    """The kernels to time: those `choice` allows that this torch, these built kernels and this CPU can run."""
    found = [Kernel.MKL]
    if choice is Choice.TUNED:
        found.append(Kernel.TRANSPOSED)
        if torch.backends.mkldnn.is_available():
            found.append(Kernel.ONEDNN)
    if kernels is not None and choice is not Choice.MKL:
        found.append(Kernel.SMALL_ROWS)
        if choice is Choice.TUNED and "avx512f" in cpu_description(read_cpuinfo())[1]:
            found.append(Kernel.AVX512_PACKED)
    return found


def time_plan(
    layers: list[torch.nn.Linear], candidates: list[Kernel], kernels: ModuleType | None, rounds: int = 3
) -> Plan:
    """The fastest candidate for each row bucket, timed over layers of one shape (their own weights)."""
    if candidates == [Kernel.MKL]:
        return (Kernel.MKL,) * len(ROW_BUCKETS)
    weight_bytes = layers[0].weight.numel() * 4
    if weight_bytes > TIMED_BYTES:
        # One weight past it (a large vocabulary's lm_head: 1.2 GB for Qwen2.5-3B) is timed on its
        # leading rows: a copy per candidate of all of it would be a transient of several GB.
        rows = TIMED_BYTES // (layers[0].in_features * 4)
        bias = layers[0].bias
        timed = [(layers[0].weight[:rows], bias[:rows] if bias is not None else None)]
    else:
        timed = [(layer.weight, layer.bias) for layer in layers[: -(-TIMED_BYTES // weight_bytes)]]
    copies = {
        kernel: [weight_copy(kernel, weight, kernels) for weight, _ in timed]
        for kernel in candidates
        if kernel.copies_weight
    }
    plan = []
    for bucket in ROW_BUCKETS:
        x = torch.randn(bucket.timed_rows, layers[0].in_features)
        spent = {kernel: [] for kernel in candidates}
        for round_ in range(rounds + 1):  # the first round warms up and is not counted
            for kernel in candidates:
                started = time.perf_counter()
                for index, (weight, bias) in enumerate(timed):
                    copy = copies[kernel][index] if kernel in copies else None
                    run_kernel(kernel, x, weight, bias, copy, kernels)
                if round_:
                    spent[kernel].append(time.perf_counter() - started)
        median = {kernel: statistics.median(times) for kernel, times in spent.items()}
        plan.append(fastest(median))
    return tuple(plan)


def fastest(median_s: dict[Kernel, float]) -> Kernel:
    """The fastest kernel, but one that needs a copy of the weight only when it wins by COPY_MARGIN."""
    in_place = min((k for k in median_s if not k.copies_weight), key=median_s.__getitem__)
    best = min(median_s, key=median_s.__getitem__)
    return best if median_s[best] < COPY_MARGIN * median_s[in_place] else in_place


def install(layer: torch.nn.Linear, plan: Plan, kernels: ModuleType | None) -> int:
    """Makes the layer a TunedLinear on `plan`; returns the bytes of the weight copies it now keeps."""
    layer.__class__ = TunedLinear
    layer.plan = plan
    layer.kernels = kernels if any(kernel in plan for kernel in (Kernel.SMALL_ROWS, Kernel.AVX512_PACKED)) else None
    layer.copies = {kernel: weight_copy(kernel, layer.weight, kernels) for kernel in set(plan) if kernel.copies_weight}
    return sum(copy.numel() * copy.element_size() for copy in layer.copies.values())


def tunable_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
        and module.weight.is_contiguous()
    ]


@dataclass(frozen=True)
class TuningReport:
    plans: dict[str, Plan]  # shape -> plan
    layers: int
    copies_bytes: int
    seconds: float
    cached: bool

    def describe(self) -> dict:
        """For /models: which kernel serves each shape at each bucket of rows."""
        return {
            "layers": self.layers,
            "copies_mb": round(self.copies_bytes / 2**20, 1),
            "tuning_s": round(self.seconds, 2),
            "from_cache": self.cached,
            "plans": {
                shape: {bucket.name: kernel.value for bucket, kernel in zip(ROW_BUCKETS, plan)}
                for shape, plan in sorted(self.plans.items())
            },
        }


def copy_bytes(weight: torch.Tensor, kernel: Kernel) -> int:
    """About what weight_copy(kernel, weight) takes (the packed panels round the features up to 48)."""
    rows = -(-weight.shape[0] // 48) * 48 if kernel is Kernel.AVX512_PACKED else weight.shape[0]
    return rows * weight.shape[1] * weight.element_size()


@dataclass
class ModelPlans:
    """A plan for every fp32 CPU linear layer of a model, not yet installed."""

    layers: list[torch.nn.Linear]
    plans: dict[str, Plan]  # shape -> plan
    kernels: ModuleType | None
    cached: bool
    seconds: float

    @property
    def copies_bytes(self) -> int:
        """The weight copies that installing the plans makes."""
        return sum(
            copy_bytes(layer.weight, kernel)
            for layer in self.layers
            for kernel in set(self.plans[shape_key(layer.weight)])
            if kernel.copies_weight
        )

    def install(self) -> TuningReport:
        started = time.perf_counter()
        copies = sum(install(layer, self.plans[shape_key(layer.weight)], self.kernels) for layer in self.layers)
        seconds = self.seconds + time.perf_counter() - started
        return TuningReport(self.plans, len(self.layers), copies, seconds, self.cached)


def plan_model(
    model: torch.nn.Module,
    build_kernels: Callable[[], ModuleType | None],
    cached_plans: dict[str, Plan],
    save: Callable[[dict[str, Plan]], object],
    choice: Choice = Choice.TUNED,
) -> ModelPlans | None:
    """Every fp32 CPU Linear's plan: the cached one for its shape, else one timed now (and saved).
    None when the model has no such layer (a GPU or bf16 model)."""
    layers = tunable_layers(model)
    if not layers:
        return None
    started = time.perf_counter()
    kernels = build_kernels() if choice is not Choice.MKL else None
    timed_kernels = candidates(kernels, choice)
    by_shape: dict[str, list[torch.nn.Linear]] = {}
    for layer in layers:
        by_shape.setdefault(shape_key(layer.weight), []).append(layer)
    plans = {shape: cached_plans[shape] for shape in by_shape if shape in cached_plans}
    missing = [shape for shape in by_shape if shape not in plans]
    with torch.inference_mode():
        for shape in missing:
            plans[shape] = time_plan(by_shape[shape], timed_kernels, kernels)
    if missing:
        save(plans)
    return ModelPlans(layers, plans, kernels, cached=not missing, seconds=time.perf_counter() - started)


def tune_model(
    model: torch.nn.Module,
    build_kernels: Callable[[], ModuleType | None],
    cached_plans: dict[str, Plan],
    save: Callable[[dict[str, Plan]], object],
    choice: Choice = Choice.TUNED,
) -> TuningReport | None:
    """Puts every fp32 CPU Linear of the model on its plan (plan_model). None when it has none."""
    planned = plan_model(model, build_kernels, cached_plans, save, choice)
    return planned.install() if planned else None
