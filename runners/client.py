"""The API process's view of the engine: the domain ports, answered by the engine service."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from domain import (
    Generation,
    GenerationParams,
    Model,
    ModelRepository,
    Prompt,
    SystemMonitor,
    error_from_type,
)


def decode_line(line: str) -> str | Generation:
    message = json.loads(line)
    if "error_type" in message:
        raise error_from_type(message["error_type"], message["error"])
    if "generation" in message:
        return Generation.from_dict(message["generation"])
    return message["text"]


def unwrap(reply: dict[str, Any]) -> Any:
    if "error_type" in reply:
        raise error_from_type(reply["error_type"], reply["error"])
    return reply["result"]


class EngineClient(ModelRepository, SystemMonitor):
    """`engine` is the GenerationEngine itself (in-process) or BentoML's proxy to its process."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    async def load_model(self, model_id: str, device: str = "auto") -> Model:
        return Model.from_dict(unwrap(await self._engine.load_model(model_id=model_id, device=device)))

    async def unload_model(self, model_id: str) -> Model:
        return Model.from_dict(unwrap(await self._engine.unload_model(model_id=model_id)))

    async def get_model(self, model_id: str) -> Model:
        return Model.from_dict(unwrap(await self._engine.get_model(model_id=model_id)))

    async def list_models(self) -> list[Model]:
        return [Model.from_dict(model) for model in unwrap(await self._engine.list_models())]

    async def stream_text(self, model_id: str, prompt: Prompt, params: GenerationParams) -> AsyncIterator[str | Generation]:
        lines = self._engine.stream_text(
            model_id=model_id,
            messages=prompt.to_list(),
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            timeout_s=params.timeout_s,
        )
        buffered = ""
        async with aclosing(lines):  # leaving early closes the connection, which cancels the generation
            async for chunk in lines:
                buffered += chunk
                *complete, buffered = buffered.split("\n")
                for line in complete:
                    yield decode_line(line)

    async def memory_usage(self) -> dict[str, Any]:
        return unwrap(await self._engine.memory_usage())

    async def optimize_memory(self) -> dict[str, Any]:
        return unwrap(await self._engine.optimize_memory())

    async def system_info(self) -> dict[str, Any]:
        return unwrap(await self._engine.system_info())
