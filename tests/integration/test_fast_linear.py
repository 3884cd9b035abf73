"""The small-row fp32 linear kernel: agreement with F.linear, batch invariance, a model switched to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from engine.layers.fast_linear import MAX_ROWS, SmallBatchLinear, accelerate

ROW_COUNTS = range(1, MAX_ROWS + 2)




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
