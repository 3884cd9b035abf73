"""MODEL_DTYPE=auto: bf16 on accelerators; on the CPU fp32, except a bf16 checkpoint on a CPU that
computes bf16 natively. The CPU's flags are faked both ways, and one real load takes what this
host's flags say."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models import devices
from engine.models.devices import cpu_computes_bf16, dtype_for, stored_dtype
from engine.repository import TransformersModelRepository

from .support import ROOMY, TINY_QWEN_ID, DirectoryCatalog

NATIVE = "model name : Xeon\nflags : avx2 fma avx512f avx512_bf16 amx_bf16\n"
EMULATED = "model name : Ryzen\nflags : avx2 fma\n"


@pytest.fixture
def bf16_checkpoint(tiny_qwen_dir, tmp_path):
    """The tiny Qwen2 stored in bfloat16, as Qwen2.5 ships."""
    folder = tmp_path / "tiny-qwen2-bf16"
    shutil.copytree(tiny_qwen_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return folder


@pytest.mark.parametrize(
    "cpuinfo, expected", [(NATIVE, torch.bfloat16), (EMULATED, torch.float32)], ids=["native", "emulated"]
)
def test_auto_takes_a_bf16_checkpoints_dtype_only_where_the_cpu_computes_bf16(monkeypatch, cpuinfo, expected):
    monkeypatch.setattr(devices, "read_cpuinfo", lambda: cpuinfo)
    assert dtype_for("cpu", "auto", torch.bfloat16) == expected
    assert dtype_for("cpu", "auto", torch.float32) == torch.float32
    assert dtype_for("cpu", "auto", None) == torch.float32
    assert dtype_for("cpu", "float32", torch.bfloat16) == torch.float32  # a setting is obeyed as it is
    assert dtype_for("cuda:0", "auto", torch.float32) == torch.bfloat16


def test_the_stored_dtype_is_read_from_the_config_under_either_name(bf16_checkpoint, tiny_qwen_dir, tmp_path):
    assert stored_dtype(bf16_checkpoint) == torch.bfloat16
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert stored_dtype(legacy) == torch.bfloat16
    assert stored_dtype(tmp_path / "missing") is None


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_a_bf16_checkpoint_loads_as_this_host_computes_it_and_int8_in_float32(bf16_checkpoint, executor, quantization):
    """The assumption, stated: on a CPU with AVX512-BF16 or AMX the load is bf16, elsewhere fp32."""
    catalog = DirectoryCatalog({TINY_QWEN_ID: bf16_checkpoint})
    repository = TransformersModelRepository(catalog, executor, ROOMY, quantization_setting=quantization)
    try:
        model = asyncio.run(repository.load_model(TINY_QWEN_ID, "cpu"))
        native = cpu_computes_bf16() and quantization == "none"
        assert model.metadata["loaded_dtype"] == ("bfloat16" if native else "float32")
        assert model.metadata["quantization"] == quantization
    finally:
        repository.unload_blocking(TINY_QWEN_ID)
