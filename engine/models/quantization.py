"""QUANTIZATION=int8: the CPU model's Linear layers with int8 weights and int8 dynamic activations.

Each weight row (output channel) gets its own scale, and so does each input row at every call;
the int8 product accumulates exactly in int32 (torch._int_mm), then the two scales bring it back
to float32. This is the scheme of torchao's Int8DynamicActivationInt8WeightConfig, without torchao
(a new dependency whose CPU int8 paths were slower). Not torch.ao's quantize_dynamic: it gives
the whole input one scale, so a row's result would depend on the other rows of the batch step.
A row's int8 product does not depend on the other rows, but rounding to int8 magnifies the float
differences that a batch's make-up already causes in attention (chunk boundaries, padding):
batched greedy answers can differ from lone ones in wording where float32's do not. Figures in
BENCHMARKS.md, "Quantization".

The embeddings stay float32; a tied lm_head becomes an int8 copy of them. CUDA and MPS loads
ignore the setting with a warning and keep their dtype (bfloat16 by default, already half size).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

NONE = "none"
INT8 = "int8"
INT8_MAX = 127
# The smallest scale: an all-zero row quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12
QUANTIZE_ROWS = 4096


def effective_quantization(setting: str, device: str) -> str:
    """The quantization a load on `device` gets: int8 only on the CPU."""
    if setting == INT8 and device != "cpu":
        logger.warning("QUANTIZATION=int8 applies to CPU loads only: loading on %s unquantized", device)
        return NONE
    return setting


def row_scales(matrix: torch.Tensor) -> torch.Tensor:
    """One symmetric int8 scale per row: its largest magnitude maps to 127."""
    return torch.linalg.vector_norm(matrix, float("inf"), dim=1, keepdim=True).clamp_min_(MIN_SCALE).div_(INT8_MAX)


class Int8Linear(torch.nn.Module):
    """A Linear whose weight is int8 with a scale per output channel and whose input is quantized
    row by row at every call."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        scales = row_scales(weight)
        quantized = torch.empty(weight.shape, dtype=torch.int8)
        # By blocks of rows: a whole float temporary of a tied lm_head's copy would be 1.2 GB for Qwen2.5-3B.
        for start in range(0, weight.shape[0], QUANTIZE_ROWS):
            rows = slice(start, start + QUANTIZE_ROWS)
            quantized[rows] = torch.round(weight[rows].float() / scales[rows])
        self.register_buffer("weight", quantized)
        self.register_buffer("weight_scale", scales.view(-1))
        self.bias = linear.bias

    @classmethod
    def fused(cls, layers: list[Int8Linear]) -> Int8Linear:
        """The layers' outputs side by side. Exact: each output row has its own scale, so this is
        what quantizing the fused float weight would give."""
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.out_features = layers[0].in_features, sum(layer.out_features for layer in layers)
        fused.register_buffer("weight", torch.cat([layer.weight for layer in layers]))
        fused.register_buffer("weight_scale", torch.cat([layer.weight_scale for layer in layers]))
        biases = [layer.bias for layer in layers]
        if any(bias is not None for bias in biases) and not all(bias is not None for bias in biases):
            raise ValueError("fused layers must all have a bias or none")
        fused.bias = torch.nn.Parameter(torch.cat(biases), requires_grad=False) if biases[0] is not None else None
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scales = row_scales(rows)
        quantized = torch.round(rows / scales).to(torch.int8)
        y = torch._int_mm(quantized, self.weight.t()).mul(scales).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linear_layers(model: torch.nn.Module) -> int:
    """Swaps every plain float32 nn.Linear for an Int8Linear; returns how many.

    One layer at a time, so each float32 weight is dropped as its layer is swapped (unless an
    embedding shares it). Run it before the linear layers are tuned, which leaves Int8Linear alone.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, Int8Linear(child))
                swapped += 1
    return swapped


def copy_off_the_weights_file(model: torch.nn.Module) -> None:
    """transformers maps the weights file into memory, and the mapping, with every page that
    quantizing read, stays while any tensor still reads from it (the embeddings and norms hold most
    of the file). Copies of the float tensors left let it go."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.is_floating_point():
                tensor.data = tensor.data.clone()


def resident_weights_bytes(quantization: str, model_dir: str, metadata: dict[str, Any], load_bytes: int) -> int:
    """What the weights take once loaded: `load_bytes` as read, or after int8 quantization an
    estimate from the config: float32 embeddings, one byte for every other parameter (the norms
    are too few to matter), and one more byte per embedding parameter for a tied lm_head's copy.
    """
    parameters = metadata.get("parameters")
    if quantization != INT8 or not parameters:
        return load_bytes
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        embedding = int(config["vocab_size"]) * int(config["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return load_bytes  # a config this cannot read: count the weights as read, the safe side
    tied_copy = embedding if config.get("tie_word_embeddings", True) else 0  # unknown: the larger
    return embedding * 4 + (parameters - embedding) + tied_copy
