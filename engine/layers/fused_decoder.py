"""A Llama-family decoder with its small operations fused, for fp32 models on the CPU.

transformers' decoder layer runs about ninety tensor operations, most of them on a few hundred
floats at a decode step, where dispatching each costs more than its arithmetic (BENCHMARKS.md,
"The decoder's small operations fused"). Here, in the engine's batch steps:
- the q, k and v projections are one matrix, and the MLP's gate and up projections another: one
  linear call where there were three, and one where there were two (and their shapes are tuned as
  such);
- each RMS norm is one kernel call, and so is the rotary embedding of a step's queries and keys,
  done in place in the fused projection's output;
- attention takes queries, keys and values as [tokens, heads, dim] straight from that output, with
  no transposes, and goes to the paged attention as before.

Only models whose modules compute exactly this are changed (FUSABLE_MODEL_TYPES); any other keeps
transformers' modules. A plain transformers call on a fused model (no engine step: `generate`, a
test's forward) still runs transformers' own attention code, through RowSlice projections.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from . import paged_attention

# Their decoder layers compute x + attn(norm(x)), then h + mlp(norm(h)), with rotate-half rotary
# embeddings, SiLU-gated MLPs and LlamaRMSNorm's norm.
FUSABLE_MODEL_TYPES = {"llama", "qwen2", "mistral"}
SILU = {"silu", "swish"}


class RowSlice(torch.nn.Module):
    """Rows [start, end) of a fused projection's output, under the name transformers' forward calls
    (q_proj, k_proj, ...). It computes the whole fused projection and slices it, so it serves
    whatever the fused layer has become (tuned, int8); only plain transformers calls use it."""

    def __init__(self, owner: torch.nn.Module, fused_name: str, start: int, end: int) -> None:
        super().__init__()
        self._owner = weakref.ref(owner)  # not a submodule: the fused layer is the owner's, counted once
        self._fused_name, self.start, self.end = fused_name, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._owner(), self._fused_name)(x)[..., self.start : self.end]

    def extra_repr(self) -> str:
        return f"{self._fused_name}[{self.start}:{self.end}]"


def fused_linear(layers: list[torch.nn.Module]) -> torch.nn.Module:
    """One layer whose output is the layers' outputs side by side. Layers of another kind than
    Linear fuse by their class's own `fused` (int8 layers quantized as they were read)."""
    kind = type(layers[0])
    if kind is not torch.nn.Linear:
        if not hasattr(kind, "fused") or any(type(layer) is not kind for layer in layers):
            raise ValueError(f"cannot fuse {', '.join(type(layer).__name__ for layer in layers)}")
        return kind.fused(layers)
    with_bias = [layer.bias is not None for layer in layers]
    if any(with_bias) and not all(with_bias):
        raise ValueError("fused layers must all have a bias or none")
    weight = torch.cat([layer.weight.detach() for layer in layers])
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=all(with_bias), device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = torch.nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
    return fused


def replace_with_fused(owner: torch.nn.Module, names: list[str], fused_name: str) -> None:
    layers = [getattr(owner, name) for name in names]
    setattr(owner, fused_name, fused_linear(layers))
    start = 0
    for name, layer in zip(names, layers):
        setattr(owner, name, RowSlice(owner, fused_name, start, start + layer.out_features))
        start += layer.out_features


class FusedAttention:
    """Mixed into a decoder layer's attention class. q|k|v in one projection, rotated in place."""

    head_dim: int
    kernels: ModuleType

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, engine_step=None, **kwargs):
        if engine_step is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        heads, kv_heads, dim = self.config.num_attention_heads, self.config.num_key_value_heads, self.head_dim
        tokens = hidden_states.shape[1]
        qkv = self.qkv_proj(hidden_states[0]).contiguous()  # [tokens, (heads + 2 kv_heads) * dim]
        cos, sin = (part[0].contiguous() for part in position_embeddings)
        self.kernels.rotary_embedding_(qkv, cos, sin, heads + kv_heads, dim)
        queries = qkv[:, : heads * dim].view(tokens, heads, dim)
        keys = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
        values = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        attended = paged_attention.attend(engine_step, self.layer_idx, queries, keys, values, self.scaling)
        return self.o_proj(attended.view(1, tokens, heads * dim)), None


class FusedMLP:
    """Mixed into a SiLU-gated MLP class: gate|up in one projection."""

    intermediate_size: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class FusedRMSNorm:
    """Mixed into an RMS norm class computing x / sqrt(mean(x^2) + eps) * weight."""

    kernels: ModuleType

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or hidden_states.dtype != torch.float32 or hidden_states.device.type != "cpu":
            return super().forward(hidden_states)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1]).contiguous()
        return self.kernels.rms_norm(rows, self.weight, self.variance_epsilon).view(hidden_states.shape)


@functools.cache
def fused_class(mixin: type, original: type) -> type:
    """The original module class with the mixin's forward; one per pair, shared by every layer."""
    return type(f"{mixin.__name__}{original.__name__}", (mixin, original), {})


def swap_class(module: torch.nn.Module, mixin: type) -> None:
    module.__class__ = fused_class(mixin, type(module))


def can_fuse(model: torch.nn.Module) -> bool:
    config = model.config
    parameter = next(model.parameters())
    layers = getattr(getattr(model, "model", None), "layers", None)
    return (
        config.model_type in FUSABLE_MODEL_TYPES
        and getattr(config, "hidden_act", None) in SILU
        and parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
        and layers is not None
        and all(hasattr(layer, name) for layer in layers for name in ("self_attn", "mlp", "input_layernorm"))
    )


def fuse_decoder(
    model: torch.nn.Module, build_kernels: Callable[[], ModuleType | None], after_each_layer: Callable[[], object] = bool
) -> int:
    """Fuses the decoder layers of a fusable fp32 CPU model; returns how many (0: left as it was,
    also where the kernels cannot be built). `after_each_layer` runs once a layer's projections are
    fused, while the ones they replaced are freed (the loader hands their heap back there)."""
    if not can_fuse(model):
        return 0
    kernels = build_kernels()
    if kernels is None:
        return 0
    layers = model.model.layers
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        replace_with_fused(attention, ["q_proj", "k_proj", "v_proj"], "qkv_proj")
        attention.kernels = kernels
        swap_class(attention, FusedAttention)
        replace_with_fused(mlp, ["gate_proj", "up_proj"], "gate_up_proj")
        swap_class(mlp, FusedMLP)
        after_each_layer()
    norms = [norm for layer in layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
    for norm in (*norms, model.model.norm):
        norm.kernels = kernels
        swap_class(norm, FusedRMSNorm)
    return len(layers)
