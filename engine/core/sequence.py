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
from typing import Any, Protocol

DEFAULT_PRIORITY = 0  # lower runs first


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence token, or a stop string
    LENGTH = "length"  # the request's max_new_tokens
    TIMEOUT = "timeout"  # its deadline passed
    CANCELLED = "cancelled"  # its caller left
    UNLOADED = "unloaded"  # the model was unloaded under it
    REFUSED = "refused"  # dropped from a full queue for a request of higher priority
    ERROR = "error"  # a failed batch step, or a dead scheduler
    UNWRITABLE = "unwritable"  # its grammar asked for text the model's tokenizer cannot write

    @property
    def completed(self) -> bool:
        """The text is a whole answer (STOP, LENGTH), not cut short by a failure."""
        return self in (FinishReason.STOP, FinishReason.LENGTH)


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log probability, and the likeliest tokens' at its position, likeliest first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


@dataclass(frozen=True)
class ScoreEvent:
    """A scoring request's answer, sent before its FinishEvent: per ScoredPosition, in order, the log
    probability of each of its tokens."""

    logprobs: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class FinishEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    detail: str = ""


Event = TokenEvent | ScoreEvent | FinishEvent
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class ScoredPosition:
    """Which tokens' log probabilities a scoring request wants from the logits at a prompt position
    (those that predict the token after it)."""

    position: int
    token_ids: tuple[int, ...]


class TokenMask(Protocol):
    """A sequence's constraint on its next token (grammar.py's matcher): fills its row of a bitmask
    of allowed tokens, and follows the tokens chosen."""

    def fill_mask(self, bitmask: Any, row: int) -> None: ...

    def accept(self, token_id: int) -> None: ...


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
    logprobs: int | None = None  # None: none; k: the chosen token's and the k likeliest tokens' log probabilities
    priority: int = DEFAULT_PRIORITY  # lower runs first, as in vLLM; equal priorities keep their order of arrival
    grammar: Callable[[], TokenMask] | None = None  # a fresh constraint for the sequence (a compiled grammar's matcher)
    scored: tuple[ScoredPosition, ...] = ()  # a scoring request: no token is generated, the prompt's logits answer
    ticket: int = 0  # its work's reservation on the queue board (queue_board.py), cleared as it is admitted

    @property
    def scoring(self) -> bool:
        return bool(self.scored)

    @property
    def first_scored_position(self) -> int:
        """The prefix cache may stand in for the prompt only before this position: scored logits are computed."""
        return self.scored[0].position if self.scored else len(self.prompt_ids)


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
    prompt_work: int = 0  # prompt tokens it was expected to compute when it was queued (the rest cached)
    output_ids: list[int] = field(default_factory=list)
    scores: dict[int, tuple[float, ...]] = field(default_factory=dict)  # a scoring request's, by position, as computed
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
