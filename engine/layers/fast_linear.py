"""fp32 linear layers on the CPU for decode batches of a few rows (csrc/small_linear.cpp).

MKL's sgemm is slow for a handful of rows: a few rows cost far more than one, though both read
the same weights. The kernel reads each weight once per call and uses it for every row, so up to
MAX_ROWS rows cost little more than one. Where the kernels
cannot be built (kernels.py) layers keep F.linear.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from .kernels import load_kernels

# Past this many rows the kernel no longer beats F.linear (scripts/bench_matmul.py; BENCHMARKS.md,
# "The small-row kernel").
MAX_ROWS = 24


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
    kernel = load_kernels()
    if kernel is None:
        return 0
    SmallBatchLinear.kernel = kernel
    for layer in layers:
        layer.__class__ = SmallBatchLinear
    return len(layers)
