"""The fused decoder (engine/layers/fused_decoder.py) against transformers' own modules: its kernels
one by one, and whole models run through the engine's batch steps against plain forward passes."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from engine.core.block_manager import BlockManager, block_hashes
from engine.core.kv_cache import PagedKVCache
from engine.core.model_runner import ModelRunner
from engine.core.scheduler import Scheduler
from engine.core.sequence import SamplingRequest, Sequence
from engine.layers import paged_attention
from engine.layers.fused_decoder import FusedAttention, FusedMLP, FusedRMSNorm, RowSlice, fuse_decoder
from engine.layers.kernels import load_kernels
from metrics import SchedulerMetrics

DIMS = {"hidden_size": 64, "intermediate_size": 136, "num_hidden_layers": 2, "num_attention_heads": 4}
# Qwen2 has q, k and v biases; Llama (SmolLM2's architecture) has none.
CONFIGS = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=300, num_key_value_heads=2, **DIMS)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=300, num_key_value_heads=1, **DIMS)),
}


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CONFIGS[model_type]().eval()


@pytest.mark.parametrize("hidden", [576, 64, 13])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_rms_norm_matches_transformers(kernel, hidden, rows):
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(rows, hidden) * 3

    torch.testing.assert_close(kernel.rms_norm(x, norm.weight, 1e-5), norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (16, 2, 128), (4, 2, 16), (2, 1, 12)])
def test_rotary_embedding_in_place_matches_transformers(kernel, heads, kv_heads, dim):
    rows = 7
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim)
    angles = torch.rand(rows, dim // 2) * 50
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    q = qkv[:, : heads * dim].view(1, rows, heads, dim).transpose(1, 2)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(1, rows, kv_heads, dim).transpose(1, 2)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    values = qkv[:, (heads + kv_heads) * dim :].clone()

    kernel.rotary_embedding_(qkv, cos, sin, heads + kv_heads, dim)

    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, expected_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], values)  # the values are not rotated


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_fusing_keeps_the_weights_once_and_plain_calls_give_the_same_logits(kernel, model_type):
    plain, fused = tiny_model(model_type), tiny_model(model_type)
    weights_before = sum(p.numel() for p in fused.parameters())

    assert fuse_decoder(fused, load_kernels) == 2

    layer = fused.model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(fused.model.norm, FusedRMSNorm)
    assert isinstance(layer.self_attn.q_proj, RowSlice) and isinstance(layer.mlp.up_proj, RowSlice)
    assert sum(p.numel() for p in fused.parameters()) == weights_before
    ids = torch.randint(0, 300, (2, 11))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_model_outside_the_llama_family_is_left_as_it_is(kernel):
    model = tiny_model("llama")
    model.config.hidden_act = "gelu"  # an MLP the fused one does not compute

    assert fuse_decoder(model, load_kernels) == 0
    assert not isinstance(model.model.layers[0].mlp, FusedMLP)


def test_no_kernels_leave_the_model_as_it_is():
    model = tiny_model("qwen2")

    assert fuse_decoder(model, lambda: None) == 0
    assert not isinstance(model.model.layers[0].self_attn, FusedAttention)


def engine_logits(
    model: torch.nn.Module, prompts: list[list[int]], new_tokens: int
) -> tuple[dict[int, list[torch.Tensor]], list[list[int]]]:
    """Each prompt's logits at every position that gave it a token, and its tokens, run in the engine's batch steps
    (a prompt chunk budget of 8 splits the prompts into chunks), greedy."""
    assert paged_attention.install(model)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = PagedKVCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, 64, torch.float32, "cpu")
    scheduler = Scheduler(
        BlockManager(cache.num_blocks),
        set(),
        max_batch_size=8,
        prefill_budget=8,
        max_queue_size=8,
        metrics=SchedulerMetrics.for_model("fused-decoder-test"),
    )
    runner = ModelRunner(model, cache, set())
    sequences = []
    for prompt in prompts:
        request = SamplingRequest(prompt, new_tokens, 0.0, time.monotonic() + 60, ignore_eos=True)
        sequences.append(Sequence(request, lambda event: None, block_hashes(prompt)))
        scheduler.add(sequences[-1], time.monotonic())
    logits_by_sequence: dict[int, list[torch.Tensor]] = {index: [] for index in range(len(prompts))}
    captured = []
    hook = model.register_forward_hook(lambda module, args, output: captured.append(output.logits[0].clone()))
    while scheduler.has_work:
        step = scheduler.schedule(time.monotonic())
        captured.clear()
        output = runner.execute(step)
        for row, sequence in enumerate(step.sampled):
            logits_by_sequence[sequences.index(sequence)].append(captured[0][row])
        scheduler.update(step, output, time.monotonic())
    hook.remove()
    return logits_by_sequence, [sequence.output_ids for sequence in sequences]


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_engine_steps_on_the_fused_decoder_give_transformers_logits(kernel, model_type):
    """Prompts of 3, 13 and 21 tokens decoded together for 5 tokens: every step's logits, through
    the fused layers, the paged cache, prompt chunks and decode attention, are those of a plain
    forward pass of transformers' unfused model over the whole sequence so far."""
    plain, fused = tiny_model(model_type), tiny_model(model_type)
    fuse_decoder(fused, load_kernels)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (length,), generator=generator).tolist() for length in (3, 13, 21)]

    logits, outputs = engine_logits(fused, prompts, new_tokens=5)

    with torch.inference_mode():
        for index, prompt in enumerate(prompts):
            sequence = prompt + outputs[index]
            expected = plain(torch.tensor([sequence])).logits[0, len(prompt) - 1 : len(sequence) - 1]
            torch.testing.assert_close(torch.stack(logits[index]), expected, rtol=1e-4, atol=1e-4)
