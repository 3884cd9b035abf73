"""A request as the scheduler holds it, and the events it sends back: a token, then how it ended.

Pure Python: the scheduler and its tests need no torch.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence token, or a stop string
    LENGTH = "length"  # the request's max_new_tokens
    TIMEOUT = "timeout"  # its deadline passed
    CANCELLED = "cancelled"  # its caller left
    UNLOADED = "unloaded"  # the model was unloaded under it
    ERROR = "error"  # a failed batch step, or a dead scheduler

    @property
    def completed(self) -> bool:
        """The text is a whole answer (STOP, LENGTH), not cut short by a failure."""
        return self in (FinishReason.STOP, FinishReason.LENGTH)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    detail: str = ""


Event = TokenEvent | FinishEvent
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class SamplingRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    deadline: float  # time.monotonic()
    top_p: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0  # the runner masks end-of-sequence tokens until this many are generated
    ignore_eos: bool = False  # an end-of-sequence token does not end the sequence


@dataclass(frozen=True)
class BlockCopy:
    """Tokens whose keys and values another prompt's cached block already holds, to be copied into
    the start of a sequence's own block before its first prompt chunk runs."""

    source: int
    target: int
    tokens: int


_sequence_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: SamplingRequest
    sink: Sink
    hashes: list[int]  # one per full prompt block (block_manager.block_hashes)
    seq_id: int = field(default_factory=lambda: next(_sequence_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    blocks: list[int] = field(default_factory=list)  # its block table, once admitted
    pending_copy: BlockCopy | None = None  # until its first prompt chunk has run
    computed: int = 0  # tokens whose keys and values are in the cache
    cached_prompt_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0
    last_token_at: float = 0.0

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.computed >= self.prompt_length

    def cancel(self) -> None:
        self.cancelled.set()
