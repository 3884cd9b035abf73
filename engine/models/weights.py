"""A CPU model's weights read tensor by tensor into an empty model, each in its load dtype, and
int8-quantized as it is read when asked: the load holds the kept weights plus one tensor in flight.

transformers' from_pretrained maps the safetensors files into memory, and every page it read stays
resident while the mapping lives: a float32 load of a bfloat16 checkpoint peaked at its float32
weights plus the whole file, and an int8 load at its float32 weights (BENCHMARKS.md, "Memory").
Here each tensor is read with plain reads into its own buffer and its page cache dropped behind it.

Only what this can do exactly is done here: safetensors weights whose names are the model's own
state dict. Anything else (renamed keys, .bin or GGUF weights, a missing tensor) returns None, and
the caller loads with from_pretrained as before.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .memory import trim_heap

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"
# Buffers read and float copies quantized are freed in the heap's midst, which glibc keeps: 1.3 GB
# of Qwen2.5-3B's int8 load stayed resident without trimming as it goes.
TRIM_EVERY = 256 << 20
SINGLE_FILE = "model.safetensors"

LinearQuantizer = Callable[[torch.nn.Linear], torch.nn.Module]


class NotStreamable(Exception):
    """These weights need from_pretrained's conversions."""


def safetensors_files(model_dir: Path) -> list[Path] | None:
    index = model_dir / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    single = model_dir / SINGLE_FILE
    return [single] if single.is_file() else None


def largest_tensor_bytes(model_dir: Path) -> int | None:
    """The largest tensor in the model's safetensors files (what a streamed load holds beside the
    weights kept), from their headers; None where there are no safetensors files."""
    files = safetensors_files(model_dir)
    if files is None:
        return None
    largest = 0
    for path in files:
        for info in _header(path)[0].values():
            start, end = info["data_offsets"]
            largest = max(largest, end - start)
    return largest


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's tensors (name -> dtype, shape, data_offsets) and where their data begins."""
    with path.open("rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    header.pop("__metadata__", None)
    return header, 8 + header_size


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file in a buffer of its own, in file order. The file's pages are
    dropped from the page cache once read: they would count against a container's memory limit."""
    header, base = _header(path)
    with path.open("rb", buffering=0) as file:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise NotStreamable(f"{name} is stored as {info['dtype']}")
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            raw = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else memoryview(b"")
            if file.seek(base + start) != base + start or file.readinto(raw) != end - start:
                raise NotStreamable(f"{path.name} ends inside {name}")
            os.posix_fadvise(file.fileno(), base + start, end - start, os.POSIX_FADV_DONTNEED)
            yield name, tensor


def load_streamed(
    model_dir: str, dtype: torch.dtype, quantize: LinearQuantizer | None = None
) -> PreTrainedModel | None:
    """The model with its weights read tensor by tensor, each floating tensor in `dtype`; with
    `quantize`, every Linear is replaced by quantize(linear) as soon as its weight is read (a tied
    lm_head, which has no weight of its own in the file, is left to the caller). None where the
    weights are not safetensors named as the model's state dict."""
    files = safetensors_files(Path(model_dir))
    if files is None:
        return None
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):  # parameters without memory; buffers (rotary) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        unreturned = 0  # bytes of temporaries freed since the heap was last trimmed
        for file in files:
            for name, tensor in read_tensors(file):
                unreturned += tensor.numel() * tensor.element_size()
                _place(model, name, tensor, dtype, quantize)
                del tensor
                if unreturned > TRIM_EVERY:
                    trim_heap()
                    unreturned = 0
        model.tie_weights()
        missing = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
        if missing:
            raise NotStreamable(f"the checkpoint lacks {', '.join(missing[:3])}")
    except NotStreamable as reason:
        logger.info("%s: loading through from_pretrained: %s", model_dir, reason)
        return None
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.eval()
    return model


def _place(
    model: PreTrainedModel, name: str, tensor: torch.Tensor, dtype: torch.dtype, quantize: LinearQuantizer | None
) -> None:
    module_name, _, attribute = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise NotStreamable(f"the model has no module for {name}") from None
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if attribute in module._parameters:
        module._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=False)
    elif attribute in module._buffers:
        module._buffers[attribute] = tensor
    else:
        raise NotStreamable(f"the model has no tensor {name}")
    if quantize is not None and type(module) is torch.nn.Linear and attribute == "weight":
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quantize(module))

