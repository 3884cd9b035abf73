"""The engine's CPU kernels: the paged decode attention against SDPA over gathered slots, batch
invariance, its checks, and where the extension is built."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.layers import kernels, paged_attention
from engine.layers.kernels import SOURCES, load_kernels
from engine.layers.paged_attention import StepPlan, decode_attention
from engine.layers.tuned_linear import tune_model

# (heads, kv heads, head dim): SmolLM2-135M, Qwen2.5-3B, plain multi-head, one KV head.
SHAPES = [(9, 3, 64), (16, 2, 128), (4, 4, 64), (8, 1, 16)]
SLOTS = 600


def decode_problem(heads: int, kv_heads: int, dim: int, lengths: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(SLOTS, kv_heads, dim, generator=generator)
    values = torch.randn(SLOTS, kv_heads, dim, generator=generator)
    queries = torch.randn(len(lengths), heads, dim, generator=generator)
    width = max(lengths) + 5  # a padded table, as the scheduler builds it
    slots = torch.stack([torch.randperm(SLOTS, generator=generator)[:width] for _ in lengths])
    return queries, keys, values, slots, torch.tensor(lengths)


def gathered_sdpa(queries, keys, values, slots, lengths, scale):
    """The reference: each sequence's keys and values gathered from its slots, then plain SDPA."""
    rows = []
    for row, length in enumerate(lengths.tolist()):
        k = keys[slots[row, :length]].transpose(0, 1)  # [kv_heads, length, dim]
        v = values[slots[row, :length]].transpose(0, 1)
        q = queries[row].unsqueeze(1)  # [heads, 1, dim]
        rows.append(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(rows)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), SHAPES)
def test_paged_decode_attention_matches_sdpa_over_the_gathered_slots(kernel, heads, kv_heads, dim):
    queries, keys, values, slots, lengths = decode_problem(heads, kv_heads, dim, [1, 7, 16, 84, 300])
    scale = dim**-0.5

    attended = kernel.paged_decode_attention(queries, keys, values, slots, lengths, scale)

    torch.testing.assert_close(attended, gathered_sdpa(queries, keys, values, slots, lengths, scale), rtol=1e-5, atol=1e-5)


def test_a_sequences_attention_does_not_depend_on_the_sequences_beside_it(kernel):
    queries, keys, values, slots, lengths = decode_problem(9, 3, 64, [3, 84, 40, 1, 129, 64])
    batched = kernel.paged_decode_attention(queries, keys, values, slots, lengths, 0.125)

    for row in range(len(lengths)):
        one = slice(row, row + 1)
        alone = kernel.paged_decode_attention(queries[one], keys, values, slots[one], lengths[one], 0.125)
        assert torch.equal(alone, batched[one]), f"sequence {row}"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: {**p, "lengths": torch.tensor([0, 3])}, "lengths within 1 and the slot table's width"),
        (lambda p: {**p, "lengths": torch.tensor([3, 99])}, "lengths within 1 and the slot table's width"),
        (lambda p: {**p, "keys": p["keys"].double(), "values": p["values"].double()}, "contiguous fp32 CPU tensors"),
        (lambda p: {**p, "slots": p["slots"].int()}, "slots [tokens, width] int64"),
        (lambda p: {**p, "queries": p["queries"][:, :, :12].contiguous()}, "head dim a multiple of 8"),
        (lambda p: {**p, "queries": p["queries"][:, :8].contiguous()}, "query heads a multiple of KV heads"),
    ],
)
def test_paged_decode_attention_refuses_what_it_cannot_read(kernel, change, message):
    queries, keys, values, slots, lengths = decode_problem(9, 3, 64, [2, 3])
    problem = change({"queries": queries, "keys": keys, "values": values, "slots": slots, "lengths": lengths})

    with pytest.raises(RuntimeError, match=re.escape(message)):
        kernel.paged_decode_attention(**problem, scale=0.125)


def test_the_engine_decodes_through_the_kernel_and_falls_back_to_sdpa_alike(kernel, monkeypatch):
    queries, keys, values, slots, lengths = decode_problem(9, 3, 64, [5, 84, 17])
    plan = StepPlan(None, torch.empty(0), len(lengths), slots, lengths, [], [])
    calls = []
    monkeypatch.setattr(kernel, "paged_decode_attention", lambda *args: calls.append(args) or torch.zeros(1), raising=False)

    decode_attention(queries, keys, values, plan, 0.125)
    assert len(calls) == 1  # an fp32 CPU cache goes to the kernel
    monkeypatch.undo()

    through_kernel = decode_attention(queries, keys, values, plan, 0.125)
    monkeypatch.setattr(paged_attention, "load_kernels", lambda: None)
    through_sdpa = decode_attention(queries, keys, values, plan, 0.125)

    torch.testing.assert_close(through_kernel, through_sdpa, rtol=1e-5, atol=1e-5)


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A path no directory can be made under (tests run as root, so permissions would not stop them)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "torch_extensions"


def test_code_that_cannot_build_beside_itself_builds_in_the_user_cache(unwritable, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(kernels, "DEFAULT_BUILD_ROOT", unwritable)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where torch puts its per-user builds

    build_dir = kernels.writable_build_dir()

    assert build_dir.parent == tmp_path / "cache" / "torch_extensions"
    assert [(build_dir / path.name).read_bytes() for path in SOURCES] == [path.read_bytes() for path in SOURCES]


def test_no_writable_build_directory_turns_the_kernels_off_with_one_warning(unwritable, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(unwritable))

    assert load_kernels.__wrapped__() is None

    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["CPU kernels off"]


def test_a_model_with_no_fp32_cpu_linear_builds_nothing(unwritable, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(unwritable))
    load_kernels.cache_clear()
    try:
        bf16_model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))
        assert tune_model(bf16_model, load_kernels, {}, lambda plans: None) is None
        assert caplog.records == []  # the build was not even tried
    finally:
        load_kernels.cache_clear()
