"""CPU loads read safetensors tensor by tensor (engine/models/weights.py): the model they give is
the one from_pretrained gives, int8 layers quantized as they are read are those quantizing the
loaded model gives, and weights this cannot read exactly fall back to from_pretrained."""

from __future__ import annotations

import shutil

import bentoml
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.layers.fused_decoder import fused_linear
from engine.models.quantization import Int8Linear, quantize_linear_layers
from engine.models.weights import largest_tensor_bytes, load_streamed, read_tensors

from .support import BUNDLED_MODEL_ID

PROMPT = torch.tensor([[1, 504, 3458, 282, 4649, 314]])


@pytest.fixture(scope="module")
def bundled_dir() -> str:
    return bentoml.models.get(BUNDLED_MODEL_ID).path


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def test_a_streamed_load_is_the_model_from_pretrained_gives(bundled_dir):
    streamed = load_streamed(bundled_dir, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()

    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tied, as the config says
    assert streamed.generation_config.eos_token_id == reference.generation_config.eos_token_id
    assert not streamed.training
    assert torch.equal(logits(streamed), logits(reference))


def test_a_bfloat16_checkpoint_loads_in_float32(tiny_qwen_dir, tmp_path):
    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_qwen_dir, bf16)
    tensors = load_file(bf16 / "model.safetensors")
    save_file({name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}, bf16 / "model.safetensors")

    streamed = load_streamed(str(bf16), torch.float32)

    assert {parameter.dtype for parameter in streamed.parameters()} == {torch.float32}
    reference = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    assert torch.equal(logits(streamed), logits(reference))


def test_int8_layers_quantized_as_read_are_those_of_quantizing_the_loaded_model(bundled_dir):
    streamed = load_streamed(bundled_dir, torch.float32, Int8Linear)
    assert quantize_linear_layers(streamed) == 1  # the tied lm_head, which has no weight in the file
    reference = AutoModelForCausalLM.from_pretrained(bundled_dir, dtype=torch.float32).eval()
    quantize_linear_layers(reference)

    ours, theirs = streamed.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert streamed.model.layers[0].mlp.up_proj.weight.dtype == torch.int8


def test_int8_layers_fuse_exactly_as_their_float_weights_would():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, features) for features in (32, 16, 16)]
    expected = Int8Linear(fused_linear(layers))
    fused = fused_linear([Int8Linear(layer) for layer in layers])
    for name in ("weight", "weight_scale", "bias"):
        assert torch.equal(getattr(fused, name), getattr(expected, name)), name
    x = torch.randn(5, 64)
    assert torch.equal(fused(x), expected(x))


def test_weights_under_names_the_model_does_not_have_fall_back_to_from_pretrained(tiny_qwen_dir, tmp_path, caplog):
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_qwen_dir, renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors["transformer.wte.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, renamed / "model.safetensors")

    with caplog.at_level("INFO", logger="engine.models.weights"):
        assert load_streamed(str(renamed), torch.float32) is None
    assert "no module for transformer.wte.weight" in caplog.text


def test_a_directory_without_safetensors_is_left_to_from_pretrained(tmp_path):
    assert load_streamed(str(tmp_path), torch.float32) is None
    assert largest_tensor_bytes(tmp_path) is None


def test_tensors_are_read_whole_and_the_largest_is_known_from_the_headers(tiny_qwen_dir):
    path = tiny_qwen_dir / "model.safetensors"
    read = dict(read_tensors(path))
    stored = load_file(path)
    assert read.keys() == stored.keys() and all(torch.equal(read[name], stored[name]) for name in read)
    assert largest_tensor_bytes(tiny_qwen_dir) == max(t.numel() * t.element_size() for t in stored.values())
