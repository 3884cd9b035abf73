"""The response cache: final answers of deterministic generations, served again without generating.

A generation is deterministic when its parameters fix its text (`GenerationParams.deterministic`).
Its key is a hash of everything that decides that text: the model id, every prompt message (the
system prompt included) and every generation parameter except those that only bound its time. A
parameter added to GenerationParams joins the key by itself; left at its default it is left out, so
the keys of requests that do not use it stay as they were. The version in the prefix changes when
the meaning of a key or of a stored answer does, which leaves old entries unread until they expire.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from typing import Any

from .generation import Generation, GenerationParams, Prompt

KEY_PREFIX = "ai-model:response:v1:"
# Parameters that bound how long a generation may take, or when it runs, but not what it says.
PARAMS_NOT_IN_KEY = frozenset({"timeout_s", "timeout_by", "priority"})


def _default_of(parameter: Field) -> Any:
    if parameter.default_factory is not MISSING:
        return parameter.default_factory()
    return parameter.default  # MISSING for a parameter without a default: always in the key


def response_key(model_id: str, prompt: Prompt, params: GenerationParams) -> str:
    values = params.to_dict()  # JSON's types: a grammar's GuidedDecoding as a dict
    deciding = {
        parameter.name: values[parameter.name]
        for parameter in fields(params)
        if parameter.name not in PARAMS_NOT_IN_KEY and getattr(params, parameter.name) != _default_of(parameter)
    }
    identity = {"model_id": model_id, "messages": prompt.to_list(), "params": deciding}
    if prompt.text is not None:  # a raw completion's text; chat prompts keep the keys they always had
        identity["text"] = prompt.text
    canonical = json.dumps(
        identity,
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return KEY_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache(abc.ABC):
    @abc.abstractmethod
    async def get(self, key: str) -> Generation | None:
        """The answer stored under the key, or None. A cache that cannot be reached answers None."""

    @abc.abstractmethod
    async def put(self, key: str, generation: Generation) -> None:
        """Stores the answer; a cache that cannot be reached drops it."""

    async def close(self) -> None:
        """Releases the cache's connections, if it has any."""


class LruResponseCache(ResponseCache):
    """In this process: at most `capacity` answers, the least recently used dropped first, each
    served for `ttl_s` seconds (0: until dropped)."""

    def __init__(self, capacity: int, ttl_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Generation]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> Generation | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, generation = entry
        if expires_at <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return generation

    async def put(self, key: str, generation: Generation) -> None:
        expires_at = self._clock() + self._ttl_s if self._ttl_s else math.inf
        self._entries[key] = (expires_at, generation)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
