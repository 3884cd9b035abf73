"""Loading a store model for serving: memory check, weights, dtype and quantization, the engine's
attention and kernels, a KV cache, and an engine core whose thread runs every generation on it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from domain import CatalogEntry, GenerationError, InsufficientMemoryError, InvalidRequestError, Prompt
from domain.generation import MAX_LABEL_TOKENS
from metrics import LOAD_SECONDS, SchedulerMetrics

from ..core.block_manager import BLOCK_SIZE, BlockManager
from ..core.detokenizer import TokenTexts
from ..core.engine_core import EngineCore
from ..core.grammar import GrammarCompiler
from ..core.kv_cache import PagedKVCache
from ..core.model_runner import ModelRunner
from ..core.queue_board import QueueBoard
from ..core.scheduler import Scheduler
from ..layers import paged_attention
from ..layers.fused_decoder import fuse_decoder
from ..layers.kernels import load_kernels
from ..layers.tuned_linear import Choice, TuningReport, plan_model
from ..layers.tuning_cache import TuningCache, default_folder, host_key
from . import quantization
from .cpu_threads import StepThreads
from .devices import dtype_for, stored_dtype
from .memory import (
    MemoryLimits,
    check_room_for,
    estimate_footprint,
    release_freed_memory,
    room_left,
    trim_heap,
    weights_at_load,
)
from .weights import largest_tensor_bytes, load_streamed

logger = logging.getLogger(__name__)
T = TypeVar("T")
# A model whose config does not say how long its context is.
DEFAULT_CONTEXT_LENGTH = 2048
# KV_CACHE_MB unset: the cache takes what the memory limits leave after the weights, up to this
# (14k tokens of Qwen2.5-3B in float32), less room for a batch step's activations; below the least, the load fails.
AUTO_KV_CACHE_MAX = 1 << 30
LEAST_KV_CACHE = 16 << 20
STEP_ACTIVATIONS = 256 << 20


def now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 32
    prefill_budget: int = 512
    batch_wait_s: float = 0.0
    kv_cache_bytes: int | None = None  # None: sized at load from the memory left (ModelLoader._kv_cache_size)
    max_queue_size: int = 256


@dataclass
class LoadedModel:
    model_id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: str
    dtype: torch.dtype
    quantization: str  # "none" or "int8"
    load_time_s: float
    memory_bytes: int
    cache: PagedKVCache
    core: EngineCore
    linear_kernels: TuningReport | None = None  # which kernel serves each linear shape, by row count
    loaded_at: datetime = field(default_factory=now)
    last_used_at: datetime = field(default_factory=now)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or DEFAULT_CONTEXT_LENGTH)

    def encode(self, prompt: Prompt) -> list[int]:
        if prompt.text is not None:  # raw text is continued as it is, after the model's BOS token if it has one
            prompt_ids = self.tokenizer(prompt.text)["input_ids"]
        else:
            text = self.tokenizer.apply_chat_template(prompt.to_list(), tokenize=False, add_generation_prompt=True)
            prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise InvalidRequestError(f"prompt: must have at least one token for model {self.model_id!r}, got none")
        return prompt_ids

    def encode_labels(self, labels: tuple[str, ...], field: str) -> list[list[int]]:
        """Each label's tokens as they would follow the prompt (as the model would write it)."""
        encoded = []
        for index, label in enumerate(labels):
            tokens = self.tokenizer(label, add_special_tokens=False)["input_ids"]
            if not 1 <= len(tokens) <= MAX_LABEL_TOKENS:
                raise InvalidRequestError(
                    f"{field}.{index}: must be 1 to {MAX_LABEL_TOKENS} tokens for model {self.model_id!r}, "
                    f"got {len(tokens)} for {label!r}"
                )
            encoded.append(tokens)
        return encoded

    @cached_property
    def token_texts(self) -> TokenTexts:
        return TokenTexts(self.tokenizer)

    @cached_property
    def grammars(self) -> GrammarCompiler:
        """Made at the first structured request: the grammar library reads the whole vocabulary."""
        return GrammarCompiler(self.tokenizer, self.model.config.vocab_size, eos_token_ids(self.model, self.tokenizer))

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuses a request past the model's context window, or larger than its whole KV cache."""
        if prompt_tokens + max_new_tokens > self.context_length:
            raise InvalidRequestError(
                f"prompt: the prompt (query and context, or messages) is {prompt_tokens} tokens and max_length "
                f"(max_tokens) asks for {max_new_tokens} more, past model {self.model_id!r}'s context window of "
                f"{self.context_length} tokens; shorten the prompt"
            )
        needed, capacity = Scheduler.blocks_needed(prompt_tokens, max_new_tokens), self.core.scheduler.blocks.usable
        if needed > capacity:
            raise InvalidRequestError(
                f"query, context and max_length: the request needs {needed * BLOCK_SIZE} tokens of KV cache, "
                f"past the {capacity * BLOCK_SIZE} that KV_CACHE_MB holds for {self.model_id!r}"
            )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def on_a_thread_of_its_own(work: Callable[[], T]) -> T:
    """Runs `work` on a new thread that ends with it, and waits. torch's OpenMP keeps a team of worker
    threads for every thread that ran parallel work, for as long as that thread lives. Once a process
    holds more OpenMP threads than cores, libgomp stops spinning at its barriers, and every parallel
    region waits for futex wake-ups: a load on a long-lived executor thread would leave its team
    behind and slow every later batch step (BENCHMARKS.md, "Measurements behind rules in the code")."""
    done: Future[T] = Future()

    def run() -> None:
        try:
            done.set_result(work())
        except BaseException as error:  # noqa: BLE001: handed to the waiting caller
            done.set_exception(error)

    thread = threading.Thread(target=run, name="model-load", daemon=True)
    thread.start()
    thread.join()
    return done.result()


class ModelLoader:
    def __init__(
        self,
        memory_limits: MemoryLimits,
        dtype: str,
        quantization_setting: str,
        batching: BatchingOptions,
        linear_kernels: Choice = Choice.TUNED,
        tuning_folder: Path | None = None,
        queue_board: QueueBoard | None = None,
        step_threads: StepThreads | None = None,
    ) -> None:
        self._memory_limits = memory_limits
        self._queue_board = queue_board
        self._step_threads = step_threads  # None: steps keep the thread count torch has
        self._dtype_setting = dtype
        self._quantization_setting = quantization_setting
        self._batching = batching
        self._linear_kernels = linear_kernels
        self._tuning_folder = tuning_folder if tuning_folder is not None else default_folder()

    def load(self, entry: CatalogEntry, device: str) -> LoadedModel:
        """The model loaded and its engine core started, on a thread of its own (see on_a_thread_of_its_own)."""
        return on_a_thread_of_its_own(lambda: self._load(entry, device))

    def _load(self, entry: CatalogEntry, device: str) -> LoadedModel:
        scheme = quantization.effective_quantization(self._quantization_setting, device)
        dtype = self._dtype(entry, device, scheme)
        check_room_for(entry.model_id, self.footprint(entry, device), device, self._memory_limits)
        logger.info("loading %s on %s as %s, quantization %s", entry.model_id, device, dtype, scheme)
        started = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(entry.path)
            model, int8_layers = self._read_weights(entry, device, dtype, scheme)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            release_freed_memory()
            raise InsufficientMemoryError(f"out of memory while loading {entry.model_id!r} on {device}: {exc}") from exc
        fused_layers = fuse_decoder(model, load_kernels, trim_heap)
        tuning = self._tune_linear_layers(entry.model_id, model)
        if not paged_attention.install(model):
            raise GenerationError(
                f"{type(model).__name__} does not route attention through transformers' attention interface, "
                f"so the engine cannot batch it"
            )
        cache = self._kv_cache(entry.model_id, model, dtype, device)
        core = self._engine_core(entry.model_id, model, tokenizer, cache)
        core.start()
        core.calibrate()
        memory_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        memory_bytes += tuning.copies_bytes if tuning else 0
        load_time = time.perf_counter() - started
        LOAD_SECONDS.labels(model=entry.model_id).observe(load_time)
        logger.info(
            "loaded %s in %.2fs (%.0f MB, KV cache %.0f MB, %d decoder layers fused, %d linear layers int8)",
            entry.model_id, load_time, memory_bytes / 2**20, cache.size_bytes / 2**20, fused_layers, int8_layers,
        )
        return LoadedModel(
            entry.model_id, model, tokenizer, device, dtype, scheme, round(load_time, 3), memory_bytes, cache, core, tuning
        )

    @staticmethod
    def _read_weights(entry: CatalogEntry, device: str, dtype: torch.dtype, scheme: str) -> tuple[PreTrainedModel, int]:
        """The model in eval mode, and how many of its linear layers are int8. On the CPU its weights
        are read tensor by tensor (models/weights.py), int8 ones quantized as they are read."""
        quantize = quantization.Int8Linear if scheme == quantization.INT8 else None
        model = load_streamed(entry.path, dtype, quantize) if device == "cpu" else None
        streamed = model is not None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(entry.path, dtype=dtype, device_map=device)
            model.eval()
        if quantize is None:
            return model, 0
        int8_layers = sum(isinstance(module, quantization.Int8Linear) for module in model.modules())
        int8_layers += quantization.quantize_linear_layers(model)  # all of them, or a tied lm_head
        if not streamed:
            quantization.copy_off_the_weights_file(model)
        release_freed_memory()  # the float32 weights the int8 layers replaced
        return model, int8_layers

    def _tune_linear_layers(self, model_id: str, model: PreTrainedModel) -> TuningReport | None:
        """Each fp32 CPU linear layer on its fastest kernel per row count, as measured on this host.
        Where the plans' weight copies (and the KV cache still to come) would break the memory
        limits, the layers take the fastest kernels that read the weights in place instead."""
        for choice in dict.fromkeys((self._linear_kernels, Choice.IN_PLACE)):
            cache = TuningCache(self._tuning_folder, f"{host_key(torch.get_num_threads())} | {choice.value}")
            planned = plan_model(model, load_kernels, cache.load(), cache.save, choice)
            if planned is None:
                return None
            copies = planned.copies_bytes
            kv_cache = self._batching.kv_cache_bytes or AUTO_KV_CACHE_MAX
            if not copies or self._room_for(model_id, copies + kv_cache):
                break
            logger.warning(
                "%s: no room for %.0f MB of weight copies beside a %.0f MB KV cache within MAX_MEMORY_USAGE and "
                "MIN_MEMORY_GB; its linear layers use their weights in place (as LINEAR_KERNELS=in_place)",
                model_id, copies / 2**20, kv_cache / 2**20,
            )
        report = planned.install()
        logger.info(
            "%s: %d linear layers of %d shapes on their kernels, %s in %.2fs (%.0f MB of weight copies)",
            model_id, report.layers, len(report.plans), "plans from the cache" if report.cached else "timed",
            report.seconds, report.copies_bytes / 2**20,
        )
        return report

    def _room_for(self, model_id: str, footprint: int) -> bool:
        try:
            check_room_for(model_id, footprint, "cpu", self._memory_limits)
        except InsufficientMemoryError:
            return False
        return True

    def _dtype(self, entry: CatalogEntry, device: str, scheme: str) -> torch.dtype:
        """int8 layers compute from fp32 activations: an int8 load never takes a bf16 checkpoint's bf16."""
        stored = stored_dtype(entry.path) if scheme != quantization.INT8 else None
        return dtype_for(device, self._dtype_setting, stored)

    def fits(self, entry: CatalogEntry, device: str) -> bool:
        """Whether a load of the model would pass its memory check now."""
        try:
            check_room_for(entry.model_id, self.footprint(entry, device), device, self._memory_limits)
        except InsufficientMemoryError:
            return False
        return True

    def footprint(self, entry: CatalogEntry, device: str) -> int:
        """The most memory a load of the model is estimated to hold at once (scripts/footprint.py
        measures it against real loads)."""
        scheme = quantization.effective_quantization(self._quantization_setting, device)
        dtype = self._dtype(entry, device, scheme)
        files_size = sum(p.stat().st_size for p in Path(entry.path).glob("*") if p.is_file())
        read_bytes = weights_at_load(entry.metadata, torch.finfo(dtype).bits // 8, files_size)
        kept_bytes = quantization.resident_weights_bytes(scheme, entry.path, entry.metadata, read_bytes)
        largest = largest_tensor_bytes(Path(entry.path)) if device == "cpu" else None
        if device != "cpu":  # the file is read through host memory
            transient_bytes = 0
        elif largest is not None:  # streamed: one tensor as read at a time
            transient_bytes = largest
        else:  # from_pretrained: the mapped file, and an int8 load's float32 weights beside their int8 copies
            transient_bytes = files_size + (read_bytes if scheme == quantization.INT8 else 0)
        return estimate_footprint(kept_bytes, self._batching.kv_cache_bytes or LEAST_KV_CACHE, transient_bytes)

    def _kv_cache(self, model_id: str, model: PreTrainedModel, dtype: torch.dtype, device: str) -> PagedKVCache:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        per_token = PagedKVCache.bytes_per_token(config.num_hidden_layers, kv_heads, head_dim, dtype)
        blocks = max(1, self._kv_cache_size(model_id, device) // (per_token * BLOCK_SIZE))
        return PagedKVCache(config.num_hidden_layers, kv_heads, head_dim, blocks, dtype, device)

    def _kv_cache_size(self, model_id: str, device: str) -> int:
        """KV_CACHE_MB, or what the memory limits leave now that the weights are in, up to AUTO_KV_CACHE_MAX."""
        if self._batching.kv_cache_bytes is not None:
            return self._batching.kv_cache_bytes
        room = room_left(device, self._memory_limits) - STEP_ACTIVATIONS
        if room < LEAST_KV_CACHE:
            raise InsufficientMemoryError(
                f"loading {model_id!r}: its weights leave {max(room, 0) / 2**20:.0f} MB for a KV cache within "
                f"MAX_MEMORY_USAGE and MIN_MEMORY_GB, below the {LEAST_KV_CACHE >> 20} MB it needs; "
                f"unload a model, add memory, or lower MIN_MEMORY_GB"
            )
        return min(room, AUTO_KV_CACHE_MAX)

    def _engine_core(
        self, model_id: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache: PagedKVCache
    ) -> EngineCore:
        batching = self._batching
        eos = eos_token_ids(model, tokenizer)
        scheduler = Scheduler(
            BlockManager(cache.num_blocks),
            eos,
            max_batch_size=batching.max_batch_size,
            prefill_budget=batching.prefill_budget,
            max_queue_size=batching.max_queue_size,
            metrics=SchedulerMetrics.for_model(model_id),
        )
        runner = ModelRunner(model, cache, eos, self._step_threads)
        return EngineCore(scheduler, runner, batching.batch_wait_s, name=model_id, board=self._queue_board)
