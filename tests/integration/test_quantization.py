"""QUANTIZATION=int8 on real layers and the real bundled model: accuracy, batch independence of a
layer's rows, what the load swaps and keeps, the memory it reports and estimates, and batching."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch

from domain import GenerationParams, PromptBuilder
from engine.layers.tuned_linear import TunedLinear
from engine.models import quantization
from engine.models.loader import BatchingOptions, ModelLoader
from engine.models.memory import LOAD_OVERHEAD, release_freed_memory, weights_at_load
from engine.models.quantization import (
    Int8Linear,
    effective_quantization,
    quantize_linear_layers,
    resident_weights_bytes,
)
from engine.models.weights import largest_tensor_bytes
from engine.repository import TransformersModelRepository

from .support import BUNDLED_MODEL_ID, ROOMY, DirectoryCatalog

FRANCE = PromptBuilder().build("What is the capital of France? Answer in one sentence.", [])
BAKE_SALE = PromptBuilder().build(
    "Is this post extremist content? Answer yes or no.", ["Post: Join our bake sale on Sunday, everyone is welcome!"]
)
CAT = PromptBuilder().build(
    "What is the name of the cat? Answer with the name only.", ["The cat in this story is called Oliver."]
)
GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0, timeout_s=120)


def run(coroutine):
    return asyncio.run(coroutine)


def rss() -> int:
    release_freed_memory()
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def int8_engine():
    with ThreadPoolExecutor(4) as executor:
        batching = BatchingOptions(max_batch_size=32, kv_cache_bytes=64 * 2**20)
        repository = TransformersModelRepository(
            DirectoryCatalog({}), executor, ROOMY, batching=batching, quantization_setting="int8"
        )
        before = rss()
        run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
        run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY))  # every weight page is touched
        repository.rss_growth = rss() - before
        yield repository
        run(repository.unload_model(BUNDLED_MODEL_ID))


def test_an_int8_layer_stays_close_to_the_float_layer_and_each_row_ignores_the_others():
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536)
    int8 = Int8Linear(linear)
    rows = torch.randn(1, 24, 576) * torch.logspace(-2, 2, 24)[None, :, None]  # rows of very different size

    with torch.inference_mode():
        together = int8(rows)
        alone = torch.cat([int8(rows[:, i : i + 1]) for i in range(rows.shape[1])], dim=1)
        exact = linear(rows)

    assert int8.weight.dtype == torch.int8 and int8.weight.shape == (1536, 576)
    assert torch.equal(together, alone)
    relative = (together - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert relative.max() < 0.02, relative.max()


def test_only_plain_float_linears_are_swapped():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4).to(torch.bfloat16))
    assert quantize_linear_layers(model) == 1
    assert isinstance(model[0], Int8Linear) and type(model[2]) is torch.nn.Linear


def test_int8_on_an_accelerator_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=quantization.__name__):
        assert effective_quantization("int8", "cuda:0") == "none"
        assert effective_quantization("int8", "mps") == "none"
    assert "QUANTIZATION=int8 applies to CPU loads only" in caplog.text
    assert effective_quantization("int8", "cpu") == "int8"
    assert effective_quantization("none", "cpu") == "none"


def test_the_bundled_model_answers_paris_with_int8_layers_and_tied_embeddings_intact(int8_engine):
    loaded = int8_engine.loaded(BUNDLED_MODEL_ID)
    model = loaded.model
    embedding = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings()

    assert not [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert not [name for name, module in model.named_modules() if isinstance(module, TunedLinear)]
    assert isinstance(lm_head, Int8Linear) and embedding.dtype == torch.float32
    # The lm_head is the tied embedding, rounded to int8: within half a step of every weight.
    dequantized = lm_head.weight.float() * lm_head.weight_scale[:, None]
    assert ((dequantized - embedding).abs() <= lm_head.weight_scale[:, None] / 2 + 1e-6).all()

    generation = run(int8_engine.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY))
    assert generation.text == "The capital of France is Paris."


def test_the_model_reports_its_quantization_and_its_smaller_weights(int8_engine):
    metadata = run(int8_engine.get_model(BUNDLED_MODEL_ID)).metadata
    float32_mb = metadata["parameters"] * 4 / 2**20

    assert metadata["quantization"] == "int8"
    assert metadata["loaded_dtype"] == "float32"  # the embeddings and the activations
    assert 0.3 * float32_mb < metadata["memory_mb"] < 0.5 * float32_mb


def test_the_process_keeps_the_int8_weights_and_lets_the_float32_ones_go(int8_engine):
    """transformers reads the float32 weights from a mapping of the file; quantizing touches every
    page of it, and they would stay in RSS while any tensor still read from the mapping."""
    loaded = int8_engine.loaded(BUNDLED_MODEL_ID)
    float32_bytes = run(int8_engine.get_model(BUNDLED_MODEL_ID)).metadata["parameters"] * 4
    growth = int8_engine.rss_growth - loaded.cache.size_bytes
    print(f"RSS grew {growth / 2**20:.0f} MiB beside the KV cache for {loaded.memory_bytes / 2**20:.0f} MiB of weights")
    assert growth < 0.75 * float32_bytes


def test_the_memory_guard_counts_the_int8_weights_and_one_tensor_read_at_a_time(int8_engine):
    """Weights are quantized as they are read (models/weights.py): beside the int8 weights a load
    holds one tensor as read, never the float32 model. scripts/footprint.py measures the estimate."""
    entry = DirectoryCatalog({}).get(BUNDLED_MODEL_ID)
    loaded = int8_engine.loaded(BUNDLED_MODEL_ID)
    read = weights_at_load(entry.metadata, 4, files_size=0)
    kept = resident_weights_bytes("int8", entry.path, entry.metadata, read)
    largest = largest_tensor_bytes(Path(entry.path))
    assert kept == pytest.approx(loaded.memory_bytes, rel=0.02)

    def footprint(quantization: str, kv_cache: int) -> int:
        loader = ModelLoader(ROOMY, "float32", quantization, BatchingOptions(kv_cache_bytes=kv_cache))
        return loader.footprint(entry, "cpu")

    assert footprint("int8", 2**30) == int(kept * LOAD_OVERHEAD) + 2**30
    assert footprint("int8", 16 * 2**20) == int(kept * LOAD_OVERHEAD) + largest  # the embeddings as read
    assert footprint("none", 2**30) == int(read * LOAD_OVERHEAD) + 2**30
    assert footprint("int8", 2**30) < footprint("none", 2**30) - 0.5 * read


def test_eight_concurrent_sequences_through_the_scheduler_keep_their_answers(int8_engine):
    prompts = [FRANCE, BAKE_SALE, CAT, FRANCE] * 2

    async def together() -> list[str]:
        generations = await asyncio.gather(*(int8_engine.generate_text(BUNDLED_MODEL_ID, p, GREEDY) for p in prompts))
        return [generation.text for generation in generations]

    steps_before = int8_engine.loaded(BUNDLED_MODEL_ID).core.scheduler.steps
    answers = run(together())
    for prompt, answer in zip(prompts, answers):
        if prompt is FRANCE:
            assert answer == "The capital of France is Paris."
        elif prompt is BAKE_SALE:
            assert "not extremist" in answer
        else:
            assert "Oliver" in answer
    # Batched: twelve tokens each for eight sequences took far fewer than 8 x 12 steps.
    assert int8_engine.loaded(BUNDLED_MODEL_ID).core.scheduler.steps - steps_before < 40
