"""The engine process: a BentoML service that owns the loaded models and runs every generation.

The API service reaches it through `bentoml.depends`. It runs as one worker, because loaded models
are process state; its answers are plain dicts (`{"result": ...}` or `{"error", "error_type"}`) so
domain errors cross the process boundary intact and become the right HTTP status on the API side.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncGenerator, Awaitable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import bentoml

from adapters.drain import defer_sigterm, drain_limit_s
from domain import ClassifyParams, Generation, GenerationParams, ModelServiceError, Prompt
from settings import ConfigurationError, get_settings

from .core.loop_bridge import off_loop
from .core.queue_board import NO_TICKET, QueueBoard, remove_abandoned_boards
from .models.catalog import BentoModelStoreCatalog

logger = logging.getLogger(__name__)
settings = get_settings()
Reply = dict[str, Any]
# During shutdown a request can still be on its way from an API worker that admitted it.
DRAIN_QUIET_S = 0.5


async def reply(operation: Awaitable[Any]) -> Reply:
    try:
        return {"result": await operation}
    except ModelServiceError as error:
        return error.to_dict()


def require_in_store(model_id: str) -> str:
    """Stops start-up (and `bentoml build`) with the fix when the default model was never imported."""
    try:
        bentoml.models.get(model_id)
    except bentoml.exceptions.NotFound:
        raise ConfigurationError(
            f"DEFAULT_MODEL_ID={model_id!r} is not in the model store under BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')}; "
            f"import it: `make setup` for the bundled model, or "
            f"`python scripts/import_model.py --from DIR --name {model_id}`"
        ) from None
    return model_id


@bentoml.service(name="generation-engine", workers=1, traffic={"timeout": int(settings.max_generation_time) + 60})
class GenerationEngine:
    # Referenced at class scope so that `bentoml build` packs the default model into the Bento.
    default_model = bentoml.models.BentoModel(require_in_store(settings.default_model_id))

    def __init__(self) -> None:
        # Imported here, not at the top: the API workers import this module for `bentoml.depends`
        # and need neither torch nor transformers.
        from .models import memory
        from .models.cpu_threads import StepThreads
        from .models.devices import configure_torch, yield_cpu_to_api_workers
        from .models.loader import BatchingOptions
        from .models.watchdog import MemoryWatchdog
        from .repository import TransformersModelRepository

        # `bentoml serve` passes on only warnings from loggers other than its own; the engine's INFO
        # lines (what each load did: dtype, fused layers, the linear kernels' plans and how long
        # timing them took) say what the service is running on.
        logging.getLogger("engine").setLevel(logging.INFO)
        yield_cpu_to_api_workers()
        self.memory = memory
        memory.limit_malloc_arenas()
        threads = configure_torch(settings.cpu_threads, settings.gpu_memory_fraction)
        self.executor = ThreadPoolExecutor(settings.max_workers, thread_name_prefix="engine")
        self.catalog = BentoModelStoreCatalog()
        remove_abandoned_boards()
        self.queue_board = QueueBoard.of_this_server()
        if self.queue_board is not None:
            self.queue_board.clear()  # a restarted engine: what the one before published died with it
        limits = memory.MemoryLimits(settings.max_memory_usage, settings.min_memory_gb, settings.gpu_memory_fraction)
        batching = BatchingOptions(
            max_batch_size=settings.max_batch_size,
            prefill_budget=settings.prefill_token_budget,
            batch_wait_s=settings.batch_wait_ms / 1000,
            kv_cache_bytes=settings.kv_cache_mb * 2**20 if settings.kv_cache_mb else None,
            max_queue_size=settings.max_queue_size,
        )
        self.repository = TransformersModelRepository(
            self.catalog,
            self.executor,
            limits,
            dtype=settings.model_dtype,
            batching=batching,
            quantization_setting=settings.quantization,
            linear_kernels=settings.linear_kernels,
            queue_board=self.queue_board,
            step_threads=StepThreads.started(threads) if threads > 1 else None,
        )
        self.watchdog = MemoryWatchdog(
            self.repository, limits, keep={settings.default_model_id}, idle_timeout_s=settings.model_idle_timeout
        )
        self.watchdog.start()
        self.preload: Future | None = None
        if settings.preload_default_model:
            self.preload = self.executor.submit(self.repository.load_blocking, settings.default_model_id, settings.device_type)
            self.preload.add_done_callback(self._report_preload)
        self.draining = False
        defer_sigterm(
            busy=self.repository.busy,
            on_drain=lambda: setattr(self, "draining", True),
            limit_s=drain_limit_s(settings.max_generation_time),
            quiet_s=DRAIN_QUIET_S,
        )

    @staticmethod
    def _report_preload(done: Future) -> None:
        if done.exception() is not None:
            logger.error("preloading the default model failed: %s", done.exception())

    @bentoml.on_shutdown
    def shut_down(self) -> None:
        self.watchdog.stop()
        if self.queue_board is not None:
            self.queue_board.path.unlink(missing_ok=True)

    async def __is_ready__(self) -> bool:
        """Not ready while the default model preloads or if that failed, after a scheduler died, or while draining."""
        preloaded = self.preload is None or (
            self.preload.done()
            and (self.preload.exception() is None or self.repository.loaded(settings.default_model_id) is not None)
        )
        return preloaded and not self.draining and not self.repository.failures()

    @bentoml.api
    async def load_model(self, model_id: str, device: str) -> Reply:
        return await reply(self._model_dict(self.repository.load_model(model_id, device)))

    @bentoml.api
    async def unload_model(self, model_id: str) -> Reply:
        return await reply(self._model_dict(self.repository.unload_model(model_id)))

    @bentoml.api
    async def get_model(self, model_id: str) -> Reply:
        return await reply(self._model_dict(self.repository.get_model(model_id)))

    @bentoml.api
    async def list_models(self) -> Reply:
        async def models() -> list[dict]:
            return [model.to_dict() for model in await self.repository.list_models()]

        return await reply(models())

    @bentoml.api
    async def stream_text(
        self, model_id: str, prompt: dict[str, Any], params: dict[str, Any], ticket: int = NO_TICKET
    ) -> AsyncGenerator[str, None]:
        """Newline-delimited JSON: `{"text"}` as tokens come (with `"logprobs"` when asked for), then
        `{"generation"}`, or `{"error", "error_type"}`.
        `prompt` and `params` are the domain's Prompt and GenerationParams as their to_dict gives them;
        `ticket` is the request's reservation on the queue board (core/queue_board.py).

        When the caller disconnects, BentoML closes this generator and the sequence leaves its batch."""
        try:
            generation = self.repository.stream_text(
                model_id, Prompt.from_dict(prompt), GenerationParams.from_dict(params), ticket
            )
            async for item in generation:
                if isinstance(item, Generation):
                    message = {"generation": item.to_dict()}
                elif item.logprobs:
                    message = {"text": str(item), "logprobs": [logprob.to_dict() for logprob in item.logprobs]}
                else:
                    message = {"text": str(item)}
                yield json.dumps(message) + "\n"
        except ModelServiceError as error:
            yield json.dumps(error.to_dict()) + "\n"

    @bentoml.api
    async def classify(
        self, model_id: str, prompt: dict[str, Any], params: dict[str, Any], ticket: int = NO_TICKET
    ) -> Reply:
        async def decision() -> dict[str, Any]:
            found = await self.repository.classify(
                model_id, Prompt.from_dict(prompt), ClassifyParams.from_dict(params), ticket
            )
            return found.to_dict()

        return await reply(decision())

    @bentoml.api
    async def memory_usage(self) -> Reply:
        return await reply(off_loop(self.executor, self.memory.process_memory))

    @bentoml.api
    async def optimize_memory(self) -> Reply:
        return await reply(off_loop(self.executor, self.memory.release_freed_memory))

    @bentoml.api
    async def system_info(self) -> Reply:
        return await reply(
            off_loop(self.executor, lambda: self.memory.system_info(settings.max_workers, settings.max_processes, settings.cpu_threads))
        )

    @staticmethod
    async def _model_dict(operation: Awaitable) -> dict:
        return (await operation).to_dict()
