"""Linear layers on the kernel measured fastest on this host: the small-row kernel's agreement with
F.linear, every candidate's, a model on its plans, and the plans' cache per host."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from domain import InsufficientMemoryError
from engine.layers import tuned_linear
from engine.layers.fused_decoder import fuse_decoder
from engine.layers.kernels import cpu_description, load_kernels, read_cpuinfo
from engine.layers.tuned_linear import (
    ROW_BUCKETS,
    Choice,
    Kernel,
    TunedLinear,
    candidates,
    install,
    run_kernel,
    tune_model,
)
from engine.layers.tuning_cache import TuningCache, host_key
from engine.models import loader as loader_module
from engine.models.loader import BatchingOptions, ModelLoader

from .support import ROOMY, TINY_QWEN_ID, DirectoryCatalog

MAX_ROWS = 24
ROW_COUNTS = range(1, MAX_ROWS + 2)
EDGE_ROWS = sorted({rows for bucket in ROW_BUCKETS for rows in (bucket.low, bucket.high or 300, bucket.timed_rows)})


@pytest.mark.parametrize("in_features", [576, 1536, 13])
@pytest.mark.parametrize("out_features", [1, 5, 191])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(kernel, in_features, out_features, with_bias):
    generator = torch.Generator().manual_seed(in_features * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    for rows in ROW_COUNTS:
        x = torch.randn(rows, in_features, generator=generator)
        # fp32 sums of in_features products of unit normals: rounding grows with sqrt(in_features).
        expected = F.linear(x, weight, bias)
        atol = 1e-4 * (in_features / 576) ** 0.5
        torch.testing.assert_close(kernel.small_linear(x, weight, bias), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("in_features", [576, 13])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel, in_features):
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(193, in_features, generator=generator)
    bias = torch.randn(193, generator=generator)
    x = torch.randn(MAX_ROWS + 1, in_features, generator=generator)
    alone = torch.cat([kernel.small_linear(x[r : r + 1], weight, bias) for r in range(len(x))])
    for rows in ROW_COUNTS:
        assert torch.equal(kernel.small_linear(x[:rows], weight, bias), alone[:rows]), f"{rows} rows"


@pytest.fixture
def avx512_kernel(kernel):
    if Kernel.AVX512_PACKED not in candidates(kernel):
        cpu = cpu_description(read_cpuinfo())[0]
        pytest.skip(f"this CPU ({cpu}) lacks AVX-512F, so the engine never offers the packed kernel on it")
    return kernel


@pytest.mark.parametrize(("in_features", "out_features"), [(576, 960), (1536, 576), (13, 5), (37, 100), (576, 49)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_avx512_kernel_matches_f_linear_at_every_row_count(avx512_kernel, in_features, out_features, with_bias):
    generator = torch.Generator().manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    panels = avx512_kernel.pack_linear_weight(weight)
    for rows in [*range(1, 18), 32, 64, 200]:
        x = torch.randn(rows, in_features, generator=generator)
        atol = 1e-4 * (in_features / 576) ** 0.5
        got = avx512_kernel.packed_linear(x, panels, bias, out_features)
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=atol, msg=f"{rows} rows")


def test_with_the_avx512_kernel_a_rows_result_does_not_depend_on_the_rows_beside_it(avx512_kernel):
    generator = torch.Generator().manual_seed(9)
    weight, bias = torch.randn(100, 576, generator=generator), torch.randn(100, generator=generator)
    panels = avx512_kernel.pack_linear_weight(weight)
    x = torch.randn(40, 576, generator=generator)
    alone = torch.cat([avx512_kernel.packed_linear(x[r : r + 1], panels, bias, 100) for r in range(len(x))])
    for rows in range(1, len(x) + 1):
        assert torch.equal(avx512_kernel.packed_linear(x[:rows], panels, bias, 100), alone[:rows]), f"{rows} rows"


def test_the_avx512_kernel_refuses_panels_of_another_shape(avx512_kernel):
    panels = avx512_kernel.pack_linear_weight(torch.randn(100, 64))
    with pytest.raises(RuntimeError, match="panels from pack_linear_weight"):
        avx512_kernel.packed_linear(torch.randn(2, 65), panels, None, 100)
    with pytest.raises(RuntimeError, match="out_features within the panels"):
        avx512_kernel.packed_linear(torch.randn(2, 64), panels, None, 145)


def tiny_model(tiny_qwen_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()


def logits_at_every_bucket(model) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        return [
            model(torch.randint(0, model.config.vocab_size, (1, rows), generator=generator)).logits
            for rows in EDGE_ROWS
        ]


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (576, 1536), (49152, 576), (5, 13)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_candidate_gives_f_linears_result_at_every_bucket(kernel, shape, with_bias):
    generator = torch.Generator().manual_seed(shape[0] + shape[1])
    layer = torch.nn.Linear(shape[1], shape[0], bias=with_bias)
    every = candidates(kernel)
    copies = {k: tuned_linear.weight_copy(k, layer.weight, kernel) for k in every if k.copies_weight}
    with torch.inference_mode():
        for rows in EDGE_ROWS:
            x = torch.randn(rows, shape[1], generator=generator)
            expected = F.linear(x, layer.weight, layer.bias)
            for candidate in every:
                got = run_kernel(candidate, x, layer.weight, layer.bias, copies.get(candidate), kernel)
                atol = 1e-4 * (shape[1] / 576) ** 0.5  # fp32 sums of in_features products: rounding grows with sqrt
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol, msg=f"{candidate} at {rows} rows")


@pytest.mark.parametrize("forced", list(Kernel))
def test_a_model_whose_layers_all_run_one_kernel_gives_the_same_logits(kernel, tiny_qwen_dir, forced):
    if forced not in candidates(kernel):
        cpu = cpu_description(read_cpuinfo())[0]
        pytest.skip(f"{forced.value} is never a candidate here: this torch build or CPU ({cpu}) cannot run it")
    plain, tuned = tiny_model(tiny_qwen_dir), tiny_model(tiny_qwen_dir)
    layers = tuned_linear.tunable_layers(tuned)
    for layer in layers:
        install(layer, (forced,) * len(ROW_BUCKETS), kernel)

    assert all(isinstance(layer, TunedLinear) for layer in layers)
    assert tuned.lm_head.weight is tuned.get_input_embeddings().weight  # still tied
    for got, expected in zip(logits_at_every_bucket(tuned), logits_at_every_bucket(plain)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_tuning_times_each_shape_once_keeps_the_plans_and_serves_the_same_logits(kernel, tiny_qwen_dir, tmp_path):
    plain, tuned, again = tiny_model(tiny_qwen_dir), tiny_model(tiny_qwen_dir), tiny_model(tiny_qwen_dir)
    cache = TuningCache(tmp_path, host_key(torch.get_num_threads()))

    first = tune_model(tuned, lambda: kernel, cache.load(), cache.save)
    second = tune_model(again, lambda: kernel, cache.load(), cache.save)

    shapes = {f"{layer.weight.shape[0]}x{layer.weight.shape[1]}" for layer in tuned_linear.tunable_layers(plain)}
    assert set(first.plans) == shapes and not first.cached
    assert second.cached and second.plans == first.plans  # from the cache: nothing timed
    assert json.loads((tmp_path / "linear-plans.json").read_text())[cache.key]
    described = first.describe()["plans"]
    assert set(described) == shapes and all(set(plan) == {b.name for b in ROW_BUCKETS} for plan in described.values())
    for got, expected in zip(logits_at_every_bucket(tuned), logits_at_every_bucket(plain)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_another_host_key_tunes_again_and_both_hosts_plans_are_kept(kernel, tiny_qwen_dir, tmp_path):
    here = TuningCache(tmp_path, host_key(2, "model name : CPU A\nflags : avx2 fma"))
    there = TuningCache(tmp_path, host_key(2, "model name : CPU B\nflags : avx2 fma avx512f"))
    tune_model(tiny_model(tiny_qwen_dir), lambda: kernel, here.load(), here.save)

    assert there.load() == {}
    report = tune_model(tiny_model(tiny_qwen_dir), lambda: kernel, there.load(), there.save)
    assert not report.cached
    assert set(json.loads((tmp_path / "linear-plans.json").read_text())) == {here.key, there.key}


def test_the_host_key_names_the_cpu_its_instruction_sets_threads_and_torch():
    cpuinfo = "model name\t: Some CPU 9000\nflags\t\t: fpu avx2 fma avx512f amx_tile sse4_2\n"
    assert cpu_description(cpuinfo) == ("Some CPU 9000", {"fpu", "avx2", "fma", "avx512f", "amx_tile", "sse4_2"})
    key = host_key(2, cpuinfo)
    assert key.startswith("Some CPU 9000 | avx2 fma avx512f amx_tile | 2 threads | torch ")
    assert host_key(4, cpuinfo) != key and host_key(2, cpuinfo.replace(" amx_tile", "")) != key


def test_a_folder_that_cannot_be_written_still_serves_tuned_layers(kernel, tiny_qwen_dir, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    cache = TuningCache(blocked / "kernel-tuning", host_key(torch.get_num_threads()))
    plain, tuned = tiny_model(tiny_qwen_dir), tiny_model(tiny_qwen_dir)

    report = tune_model(tuned, lambda: kernel, cache.load(), cache.save)

    assert report.layers == len(tuned_linear.tunable_layers(plain)) and not report.cached
    assert cache.save(report.plans) is False
    for got, expected in zip(logits_at_every_bucket(tuned), logits_at_every_bucket(plain)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_in_place_uses_no_kernel_that_copies_weights_and_mkl_times_and_builds_nothing(kernel, tiny_qwen_dir, tmp_path):
    in_place = tune_model(tiny_model(tiny_qwen_dir), lambda: kernel, {}, lambda plans: None, Choice.IN_PLACE)
    assert in_place.copies_bytes == 0
    assert all(not k.copies_weight for plan in in_place.plans.values() for k in plan)

    def no_build():
        raise AssertionError("LINEAR_KERNELS=mkl builds no kernel")

    mkl = tune_model(tiny_model(tiny_qwen_dir), no_build, {}, lambda plans: None, Choice.MKL)
    assert {k for plan in mkl.plans.values() for k in plan} == {Kernel.MKL} and mkl.copies_bytes == 0


def test_a_copy_is_kept_only_when_it_wins_by_the_margin():
    assert tuned_linear.fastest({Kernel.MKL: 1.0, Kernel.ONEDNN: 0.95, Kernel.SMALL_ROWS: 1.2}) is Kernel.MKL
    assert tuned_linear.fastest({Kernel.MKL: 1.0, Kernel.ONEDNN: 0.5, Kernel.SMALL_ROWS: 1.2}) is Kernel.ONEDNN
    assert tuned_linear.fastest({Kernel.MKL: 1.0, Kernel.TRANSPOSED: 0.95, Kernel.SMALL_ROWS: 0.8}) is Kernel.SMALL_ROWS


def test_calls_that_need_gradients_keep_f_linear(kernel):
    layer = torch.nn.Linear(13, 5)
    install(layer, (Kernel.SMALL_ROWS,) * len(ROW_BUCKETS), kernel)
    x = torch.randn(2, 13)

    layer(x).sum().backward()

    assert layer.weight.grad is not None


@pytest.fixture
def tiny_qwen_entry(tiny_qwen_dir):
    return DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir}).entries()[TINY_QWEN_ID]


def seed_copying_plans(folder, tiny_qwen_dir) -> int:
    """Plans that copy every weight, cached as this host's tuned ones; returns the copies' bytes."""
    model = tiny_model(tiny_qwen_dir)
    fuse_decoder(model, load_kernels)  # the loader fuses before it plans
    layers = tuned_linear.tunable_layers(model)
    plans = {tuned_linear.shape_key(layer.weight): (Kernel.TRANSPOSED,) * len(ROW_BUCKETS) for layer in layers}
    TuningCache(folder, f"{host_key(torch.get_num_threads())} | tuned").save(plans)
    return sum(layer.weight.numel() * 4 for layer in layers)


@pytest.mark.parametrize("room", [True, False])
def test_weight_copies_are_made_only_where_they_fit_in_memory(
    kernel, tiny_qwen_dir, tiny_qwen_entry, tmp_path, monkeypatch, caplog, room
):
    copies = seed_copying_plans(tmp_path, tiny_qwen_dir)
    kv_cache = 16 << 20
    checked = []

    def check_room_for(model_id, footprint, device, limits):
        checked.append(footprint)  # the load's own check first, then the copies' with the KV cache
        if not room and len(checked) > 1:
            raise InsufficientMemoryError(f"{model_id}: no room for {footprint} bytes")

    monkeypatch.setattr(loader_module, "check_room_for", check_room_for)
    loader = ModelLoader(ROOMY, "float32", "none", BatchingOptions(kv_cache_bytes=kv_cache), tuning_folder=tmp_path)
    loaded = loader.load(tiny_qwen_entry, "cpu")
    try:
        report = loaded.linear_kernels
        assert checked[1] == copies + kv_cache
        if room:
            assert report.copies_bytes == copies and report.cached
            assert {kernel for plan in report.plans.values() for kernel in plan} == {Kernel.TRANSPOSED}
        else:
            assert report.copies_bytes == 0 and "no room for" in caplog.text
            assert not any(kernel.copies_weight for plan in report.plans.values() for kernel in plan)
        tensors = (*loaded.model.parameters(), *loaded.model.buffers())
        assert loaded.memory_bytes == sum(t.numel() * t.element_size() for t in tensors) + report.copies_bytes
    finally:
        loaded.core.stop()
