"""The small-row fp32 linear kernel: agreement with F.linear, batch invariance, a model switched to it,
and where it is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from runners import fast_linear
from runners.fast_linear import MAX_ROWS, SOURCE, SmallBatchLinear, accelerate, cpu_has_avx2_fma, load_kernel

ROW_COUNTS = range(1, MAX_ROWS + 2)


@pytest.fixture(scope="module")
def kernel():
    built = load_kernel()
    if built is None:
        if not cpu_has_avx2_fma():
            pytest.skip("this CPU lacks AVX2 or FMA, so the small-row kernel is never built on it")
        pytest.fail("the small-row kernel did not build on a CPU with AVX2 and FMA (see the logged warning)")
    return built


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


def test_an_accelerated_model_gives_the_same_logits(kernel, tiny_qwen_dir):
    plain = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    fast = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float32).eval()
    linear_layers = sum(type(module) is torch.nn.Linear for module in fast.modules())

    assert accelerate(fast) == linear_layers
    assert isinstance(fast.lm_head, SmallBatchLinear)
    assert fast.lm_head.weight is fast.get_input_embeddings().weight  # still tied
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for tokens in (1, 8, MAX_ROWS, MAX_ROWS + 1):  # the last goes through F.linear
            ids = torch.randint(0, plain.config.vocab_size, (1, tokens), generator=generator)
            torch.testing.assert_close(fast(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def test_calls_that_need_gradients_keep_f_linear(kernel):
    layer = torch.nn.Linear(13, 5)
    layer.__class__ = SmallBatchLinear
    x = torch.randn(2, 13)

    layer(x).sum().backward()

    assert layer.weight.grad is not None


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A path no directory can be made under (tests run as root, so permissions would not stop them)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "torch_extensions"


def test_code_that_cannot_build_beside_itself_builds_in_the_user_cache(unwritable, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(fast_linear, "DEFAULT_BUILD_ROOT", unwritable)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where torch puts its per-user builds

    build_dir = fast_linear.writable_build_dir()

    assert build_dir.parent == tmp_path / "cache" / "torch_extensions"
    assert (build_dir / SOURCE.name).read_bytes() == SOURCE.read_bytes()


def test_no_writable_build_directory_turns_the_kernel_off_with_one_warning(unwritable, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(unwritable))

    assert load_kernel.__wrapped__() is None

    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["small-row linear kernel off"]


def test_a_model_with_no_fp32_cpu_linear_builds_nothing(unwritable, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(unwritable))
    load_kernel.cache_clear()
    try:
        assert accelerate(torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))) == 0
        assert caplog.records == []  # the build was not even tried
    finally:
        load_kernel.cache_clear()
