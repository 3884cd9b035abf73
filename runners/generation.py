"""A loaded model and what a generation on it needs: prompt encoding, the context-window check,
the bridge from the scheduler thread to the event loop, and incremental detokenization with stop strings."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from domain import InvalidRequestError, Prompt

from .kv_cache import PagedKVCache
from .scheduler import BatchScheduler, Event, FinishEvent


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
    scheduler: BatchScheduler
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    last_used_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def encode_prompt(loaded: LoadedModel, prompt: Prompt) -> list[int]:
    if prompt.text is not None:  # raw text is continued as it is, after the model's BOS token if it has one
        prompt_ids = loaded.tokenizer(prompt.text)["input_ids"]
    else:
        text = loaded.tokenizer.apply_chat_template(prompt.to_list(), tokenize=False, add_generation_prompt=True)
        prompt_ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise InvalidRequestError(f"prompt: must have at least one token for model {loaded.model_id!r}, got none")
    return prompt_ids


def check_context_window(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    if prompt_tokens + max_new_tokens > loaded.context_length:
        raise InvalidRequestError(
            f"prompt: the prompt (query and context, or messages) is {prompt_tokens} tokens and max_length "
            f"(max_tokens) asks for {max_new_tokens} more, past model {loaded.model_id!r}'s context window of "
            f"{loaded.context_length} tokens; shorten the prompt"
        )


class LoopMailbox:
    """Hands scheduler events to one event loop, waking it once per batch step rather than once
    per token: every wake-up costs the loop (and the GIL the scheduler thread needs) a round."""

    _by_loop: dict[asyncio.AbstractEventLoop, LoopMailbox] = {}
    _creation = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Event]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        with cls._creation:
            for closed in [other for other in cls._by_loop if other.is_closed()]:
                del cls._by_loop[closed]
            return cls._by_loop.setdefault(loop, cls(loop))

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._items.append((queue, event))
            if len(self._items) > 1:
                return  # a delivery is already scheduled and will take this one too
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            with self._lock:
                self._items.clear()

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


class EventStream:
    """Scheduler events for one sequence, handed from the scheduler thread to the asking event loop."""

    def __init__(self) -> None:
        self._mailbox = LoopMailbox.of(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(self, event: Event) -> None:
        self._mailbox.post(self._queue, event)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return


class IncrementalDecoder:
    """Text deltas from token ids, holding back bytes of a character that is not complete yet, and
    text that may be the start of a stop string. The text ends before the first stop string it
    contains (`stopped` is then set), so a stop string is never sent."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._decoded = ""  # the text so far, cut before a stop string
        self._sent = 0  # characters of it handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:  # the text has ended
            return ""
        self.token_ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self.token_ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        after = decode(self.token_ids[self._prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        return self._pass(after[len(before) :])

    def flush(self) -> str:
        """What was held back as a possible stop string's start, once the generation has ended."""
        return self._take(len(self._decoded))

    def text(self) -> str:
        """The whole text as generated, whitespace kept. With stop strings, the text the deltas made,
        ending before the stop string if one came."""
        if self._stop:
            return self._decoded
        return self._tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def _pass(self, delta: str) -> str:
        if not self._stop:
            self._decoded += delta
            return self._take(len(self._decoded))
        searched_from = max(0, len(self._decoded) - max(map(len, self._stop)) + 1)
        self._decoded += delta
        found = [at for at in (self._decoded.find(stop, searched_from) for stop in self._stop) if at >= 0]
        if found:
            self._decoded, self.stopped = self._decoded[: min(found)], True
            return self._take(len(self._decoded))
        return self._take(len(self._decoded) - self._held_back())

    def _held_back(self) -> int:
        """The longest end of the text that a stop string starts with."""
        longest = min(len(self._decoded), max(map(len, self._stop)) - 1)
        for size in range(longest, 0, -1):
            if any(stop.startswith(self._decoded[-size:]) for stop in self._stop):
                return size
        return 0

    def _take(self, end: int) -> str:
        delta = self._decoded[self._sent : end]
        self._sent = max(self._sent, end)
        return delta
