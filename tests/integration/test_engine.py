"""The engine on real models: the bundled SmolLM2 (real answers) and a tiny random Qwen2 (the Qwen code path)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

from domain import (
    DeviceNotAvailableError,
    GenerationError,
    GenerationParams,
    GenerationTimeoutError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotLoadedError,
    PromptBuilder,
)
from engine.models.devices import available_devices
from engine.models.memory import MemoryLimits, SystemMemory, system_memory
from engine.models.watchdog import MemoryWatchdog
from engine.repository import TransformersModelRepository

from .support import BUNDLED_MODEL_ID, QUANTIZATIONS, ROOMY, TINY_QWEN_ID, DirectoryCatalog

FRANCE = PromptBuilder().build("What is the capital of France? Answer in one sentence.", [])
GREEDY = GenerationParams(max_new_tokens=20, temperature=0.0, timeout_s=60)
both_quantizations = pytest.mark.parametrize("repository", QUANTIZATIONS, indirect=True)


def run(coroutine):
    return asyncio.run(coroutine)


def rss() -> int:
    return psutil.Process().memory_info().rss


@both_quantizations
def test_bundled_model_answers_the_france_question_with_paris(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    generation = run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY))
    assert "Paris" in generation.text
    assert generation.finish_reason == "stop"
    assert generation.completion_tokens < GREEDY.max_new_tokens
    assert generation.prompt_tokens > 20


@both_quantizations
def test_context_passages_reach_the_model(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    prompt = PromptBuilder().build(
        "What is the name of the cat? Answer with the name only.", ["The cat in this story is called Oliver."]
    )
    generation = run(repository.generate_text(BUNDLED_MODEL_ID, prompt, GREEDY))
    assert "Oliver" in generation.text


def test_load_unload_reload_reports_state(repository):
    loaded = run(repository.load_model(BUNDLED_MODEL_ID, "auto"))
    device = available_devices()[0]  # auto: cuda, then mps, then cpu; bf16 on an accelerator, else fp32 as stored
    assert loaded.is_loaded and loaded.device == device
    assert loaded.metadata["load_time_s"] > 0
    assert loaded.metadata["loaded_dtype"] == ("float32" if device == "cpu" else "bfloat16")
    assert loaded.metadata["quantization"] == "none"
    unloaded = run(repository.unload_model(BUNDLED_MODEL_ID))
    assert not unloaded.is_loaded and unloaded.device == "none"
    with pytest.raises(ModelNotLoadedError):
        run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY))
    reloaded = run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    assert reloaded.is_loaded
    assert "Paris" in run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY)).text


def test_unloading_releases_the_models_memory(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY))  # every weight page is touched
    model_bytes = repository.loaded(BUNDLED_MODEL_ID).memory_bytes
    before = rss()
    run(repository.unload_model(BUNDLED_MODEL_ID))
    freed = before - rss()
    print(f"model {model_bytes / 2**20:.0f} MiB, RSS fell by {freed / 2**20:.0f} MiB on unload")
    assert freed > 0.6 * model_bytes


def test_concurrent_loads_of_one_model_load_it_once(repository):
    async def load_twice():
        return await asyncio.gather(*(repository.load_model(BUNDLED_MODEL_ID, "cpu") for _ in range(3)))

    models = run(load_twice())
    assert all(model.is_loaded for model in models)
    assert len({model.metadata["loaded_at"] for model in models}) == 1


def native_threads() -> int:
    """Threads of this process that Python did not start: OpenMP's workers among them."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def test_a_load_leaves_no_openmp_workers_behind_on_the_loading_thread(repository):
    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here: OpenMP starts no workers to leave behind")
    with ThreadPoolExecutor(1) as long_lived:  # like the engine's executor, it outlives the load
        long_lived.submit(lambda: None).result()
        before = native_threads()
        repository.load_blocking(BUNDLED_MODEL_ID, "cpu")  # a model large enough for parallel work
        long_lived.submit(lambda: repository.load_blocking(TINY_QWEN_ID, "cpu")).result()
        # The loads ran on threads that ended with them, taking their OpenMP teams along (the workers
        # exit just after their thread's end); a team left on a live thread makes libgomp stop spinning
        # at barriers, slowing every batch step. Each model's engine core thread keeps the team of the
        # steps it ran at load (EngineCore.calibrate), as it will for every batch step.
        expected = before + 2 * (torch.get_num_threads() - 1)
        deadline = time.monotonic() + 5
        while native_threads() != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert native_threads() == expected


def test_unknown_model_is_not_found_and_lists_what_exists(repository):
    # Not qwen-model_full: scripts/full_size.py imports a model under that name into this store.
    with pytest.raises(ModelNotFoundError, match="never-imported.*available: .*smollm2-135m-instruct.*import_model.py"):
        run(repository.load_model("never-imported", "cpu"))
    with pytest.raises(ModelNotFoundError):
        run(repository.generate_text("never-imported", FRANCE, GREEDY))


def test_absent_device_is_not_available_and_unknown_device_is_invalid(repository):
    with pytest.raises(DeviceNotAvailableError, match="cuda:99.*available: .*cpu"):
        run(repository.load_model(BUNDLED_MODEL_ID, "cuda:99"))
    with pytest.raises(InvalidRequestError, match="device"):
        run(repository.load_model(BUNDLED_MODEL_ID, "tpu"))


def test_load_that_would_break_the_memory_limits_is_refused_before_it_starts(tiny_qwen_dir, executor):
    strict = MemoryLimits(max_usage_fraction=0.9, min_free_gb=100_000, gpu_memory_fraction=0.8)
    repository = TransformersModelRepository(DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir}), executor, strict)
    with pytest.raises(InsufficientMemoryError, match="MIN_MEMORY_GB=100000"):
        run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    assert repository.loaded(BUNDLED_MODEL_ID) is None


def test_a_load_that_would_pass_max_memory_usage_is_refused_naming_it(tiny_qwen_dir, executor):
    system = system_memory()
    used = (system.total - system.available) / system.total
    # Room for a few MB more, not for SmolLM2's half gigabyte: only the MAX_MEMORY_USAGE branch refuses it.
    strict = MemoryLimits(max_usage_fraction=used + 0.005, min_free_gb=0.0, gpu_memory_fraction=0.8)
    repository = TransformersModelRepository(DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir}), executor, strict)

    with pytest.raises(InsufficientMemoryError, match=r"above MAX_MEMORY_USAGE=0\.\d+"):
        run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    assert repository.loaded(BUNDLED_MODEL_ID) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU_MEMORY_FRACTION bounds CUDA loads; no CUDA device here")
def test_a_cuda_load_past_gpu_memory_fraction_is_refused_naming_it(tiny_qwen_dir, executor):
    tiny = MemoryLimits(max_usage_fraction=0.99, min_free_gb=0.0, gpu_memory_fraction=0.0001)
    repository = TransformersModelRepository(DirectoryCatalog({TINY_QWEN_ID: tiny_qwen_dir}), executor, tiny)

    with pytest.raises(InsufficientMemoryError, match="within GPU_MEMORY_FRACTION=0.0001"):
        run(repository.load_model(BUNDLED_MODEL_ID, "cuda"))


def test_prompt_past_the_context_window_is_refused(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    huge = PromptBuilder().build("word " * 9000, [])
    with pytest.raises(InvalidRequestError, match="context window of 8192 tokens"):
        run(repository.generate_text(BUNDLED_MODEL_ID, huge, GREEDY))


def test_generation_past_its_deadline_is_stopped_inside_the_loop(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    long = GenerationParams(max_new_tokens=400, temperature=0.0, timeout_s=0.3)
    threads_before = threading.active_count()
    with pytest.raises(GenerationTimeoutError, match="MAX_GENERATION_TIME"):
        run(repository.generate_text(BUNDLED_MODEL_ID, PromptBuilder().build("Tell a very long story.", []), long))
    assert threading.active_count() <= threads_before + 4  # the executor's threads, nothing left behind


def test_sampling_with_temperature_generates_text(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    generation = run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GenerationParams(10, 0.7, 60)))
    assert generation.text and generation.temperature == 0.7


@both_quantizations
def test_tiny_qwen2_model_loads_and_generates_deterministically(repository):
    model = run(repository.load_model(TINY_QWEN_ID, "cpu"))
    assert model.is_loaded and model.device == "cpu"
    params = GenerationParams(max_new_tokens=8, temperature=0.0, timeout_s=60)
    prompt = PromptBuilder().build("test query", ["some context"])
    first = run(repository.generate_text(TINY_QWEN_ID, prompt, params))
    second = run(repository.generate_text(TINY_QWEN_ID, prompt, params))
    assert first.completion_tokens >= 1
    assert first.text == second.text
    assert run(repository.unload_model(TINY_QWEN_ID)).is_loaded is False


def test_watchdog_unloads_idle_models_least_recently_used_first_but_keeps_the_default(repository):
    run(repository.load_model(TINY_QWEN_ID, "cpu"))
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY))  # the bundled model is the more recent
    pressure = iter([SystemMemory(100, 1), SystemMemory(100, 1), SystemMemory(100, 1), SystemMemory(100, 50)])
    watchdog = MemoryWatchdog(repository, ROOMY, keep={BUNDLED_MODEL_ID}, measure=lambda: next(pressure))
    assert repository.idle_models() == [TINY_QWEN_ID, BUNDLED_MODEL_ID]
    assert watchdog.check() == [TINY_QWEN_ID]
    assert repository.loaded(TINY_QWEN_ID) is None and repository.loaded(BUNDLED_MODEL_ID) is not None


def test_watchdog_does_nothing_within_the_limits(repository):
    run(repository.load_model(TINY_QWEN_ID, "cpu"))
    watchdog = MemoryWatchdog(repository, ROOMY, keep=set(), measure=lambda: SystemMemory(100 * 2**30, 80 * 2**30))
    assert watchdog.check() == []
    assert repository.loaded(TINY_QWEN_ID) is not None


def test_a_model_in_use_is_never_unloaded_by_the_watchdog(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    watchdog = MemoryWatchdog(repository, ROOMY, keep=set(), measure=lambda: SystemMemory(100, 1))
    story = PromptBuilder().build("Tell a long story about a dragon.", [])

    async def check_while_generating() -> list[str]:
        unloaded = []
        async for item in repository.stream_text(BUNDLED_MODEL_ID, story, GenerationParams(30, 0.0, 60)):
            if isinstance(item, str) and not unloaded:
                unloaded.append(watchdog.check())
        return unloaded

    assert run(check_while_generating()) == [[]]
    assert watchdog.check() == [BUNDLED_MODEL_ID]


@both_quantizations
def test_two_models_generate_at_the_same_time_each_in_its_own_batch(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    run(repository.load_model(TINY_QWEN_ID, "cpu"))
    tiny_params = GenerationParams(max_new_tokens=6, temperature=0.0, timeout_s=60)

    async def both() -> tuple:
        return await asyncio.gather(
            repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY),
            repository.generate_text(TINY_QWEN_ID, FRANCE, tiny_params),
            repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY),
        )

    smol, tiny, smol_again = run(both())
    assert "Paris" in smol.text and smol.text == smol_again.text
    assert tiny.model_id == TINY_QWEN_ID and tiny.completion_tokens >= 1
    assert repository.loaded(BUNDLED_MODEL_ID).core is not repository.loaded(TINY_QWEN_ID).core


def test_models_unused_for_the_idle_timeout_are_unloaded(repository):
    run(repository.load_model(BUNDLED_MODEL_ID, "cpu"))
    run(repository.load_model(TINY_QWEN_ID, "cpu"))
    roomy = lambda: SystemMemory(100 * 2**30, 80 * 2**30)  # noqa: E731: no memory pressure at all
    watchdog = MemoryWatchdog(repository, ROOMY, keep=set(), measure=roomy, idle_timeout_s=5.0)
    # Used after the second load, however long that took (its KV cache, its linear layers' timing).
    run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY))
    assert watchdog.check() == []
    time.sleep(5.1)
    run(repository.generate_text(BUNDLED_MODEL_ID, FRANCE, GREEDY))  # the bundled model is used again
    assert watchdog.check() == [TINY_QWEN_ID]
    assert repository.loaded(BUNDLED_MODEL_ID) is not None


def test_a_dead_scheduler_fails_its_requests_at_once_and_is_reported_until_reloaded(repository, monkeypatch):
    params = GenerationParams(max_new_tokens=8, temperature=0.0, timeout_s=60)
    prompt = PromptBuilder().build("test query", [])
    run(repository.load_model(TINY_QWEN_ID, "cpu"))
    scheduler = repository.loaded(TINY_QWEN_ID).core.scheduler

    def broken_admission() -> None:  # outside the guarded step: as a bug in the loop itself would
        raise RuntimeError("admission broke")

    monkeypatch.setattr(scheduler, "_admit", broken_admission)
    for _ in range(2):  # the request that meets the failure, then one sent to the dead thread
        started = time.monotonic()
        with pytest.raises(GenerationError, match="admission broke"):
            run(repository.generate_text(TINY_QWEN_ID, prompt, params))
        assert time.monotonic() - started < 5
    assert repository.failures() == {TINY_QWEN_ID: "RuntimeError: admission broke"}
    assert run(repository.get_model(TINY_QWEN_ID)).metadata["engine_error"] == "RuntimeError: admission broke"

    run(repository.unload_model(TINY_QWEN_ID))
    run(repository.load_model(TINY_QWEN_ID, "cpu"))
    assert repository.failures() == {}
    assert run(repository.generate_text(TINY_QWEN_ID, prompt, params)).completion_tokens >= 1
    run(repository.unload_model(TINY_QWEN_ID))
