"""Structured output: a grammar (JSON schema, any JSON object, regex, choice list) compiled for the
model's tokenizer, and per sequence a matcher that fills its row of a bitmask of allowed next tokens
and follows the tokens chosen. Built on llguidance; why that one: scripts/bench_grammar.py.

JSON is compact (no whitespace between tokens): a small model offered free whitespace can emit it
forever. Once a grammar is complete only the end-of-sequence tokens are allowed, so generation stops.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch

from domain import GuidedDecoding, InvalidRequestError

ANY_OBJECT_SCHEMA = '{"type": "object"}'
# Overrides, so a schema's own "x-guidance" options cannot bring free whitespace back.
JSON_OPTIONS = {"whitespace_flexible": False}
SHOWN_CHARS = 200  # of a refused value, in its error message
KIND_NAMES = {
    "json_schema": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regex",
    "choice": "choice list",
}
# -inf's bit pattern as the signed integer of its width: apply_bitmask builds its 0/-inf bias from bits.
NEG_INF_BITS = {
    torch.float32: (torch.int32, -0x800000),
    torch.bfloat16: (torch.int16, -0x80),
    torch.float16: (torch.int16, -0x400),
}


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """int32 words, on the CPU, bit t % 32 of word t // 32 set where token t is allowed."""
    return torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Sets, in place, the disallowed tokens of `logits` rows to -inf: bitmask row i masks logits row
    rows[i] (all rows, in order, when `rows` is None). float32, bfloat16 or float16 logits, any device.

    Adds a bias of 0 and -inf rather than masked_fill: over [32, 49152] that is 0.7 ms against 3 ms
    for masked_fill with a boolean mask, which torch does not vectorize on the CPU."""
    count, vocab_size = (logits.shape[0] if rows is None else len(rows)), logits.shape[-1]
    if bitmask.shape[1] * 32 < vocab_size:
        raise ValueError(f"the bitmask covers {bitmask.shape[1] * 32} tokens, the logits {vocab_size}")
    if logits.dtype not in NEG_INF_BITS:
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    # Little-endian words, so a word's bytes hold its bits in token order.
    disallowed = np.unpackbits((~bitmask[:count].numpy()).view(np.uint8), axis=-1, bitorder="little")
    integer_type, bits = NEG_INF_BITS[logits.dtype]
    bias = torch.from_numpy(disallowed[:, :vocab_size]).to(integer_type).mul_(bits).view(logits.dtype)
    bias = bias.to(logits.device, non_blocking=True)
    if rows is None:
        logits.add_(bias)
    else:
        logits.index_add_(0, torch.tensor(rows, device=logits.device), bias)


class GrammarMatcher:
    """One sequence's place in its grammar. Not thread-safe: one sequence, one thread at a time."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)

    def accept(self, token_id: int) -> None:
        """Advances past `token_id`; refused, the matcher stays refused and must not be used again."""
        if not self._matcher.consume_token(token_id):
            raise ValueError(one_line(self._matcher.get_error()))

    @property
    def finished(self) -> bool:
        """The grammar is complete and nothing but end of sequence may follow (or has followed)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()


class CompiledGrammar:
    def __init__(self, start: llguidance.LLMatcher) -> None:
        self._start = start  # never advanced: each sequence gets a copy

    def matcher(self) -> GrammarMatcher:
        # A copy costs microseconds; a new LLMatcher parses the grammar again (7 ms for a 60-field schema).
        return GrammarMatcher(self._start.deep_copy())


class GrammarCompiler:
    """Compiles requests' grammars for one model's tokenizer, keeping the last `cache_size` compiled.
    Thread-safe. Made once per model: reading the vocabulary takes about a second."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], cache_size: int = 256) -> None:
        # The bitmask spans vocab_size (the logits' width); tokens past the tokenizer's are never allowed.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, guided: GuidedDecoding) -> CompiledGrammar:
        """Raises InvalidRequestError, naming guided.field, for a grammar that cannot be followed."""
        key = (guided.kind, guided.value)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        start = llguidance.LLMatcher(self._tokenizer, grammar_text(guided), log_level=0)
        if start.is_error():
            problem = f"not a {KIND_NAMES[guided.kind]} this server can follow ({one_line(start.get_error())})"
            raise InvalidRequestError(f"{guided.field}: {problem}, got {shown(guided.value)}")
        with self._lock:  # another thread may have compiled it meanwhile: every caller gets the same one
            compiled = self._cache.setdefault(key, CompiledGrammar(start))
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


def grammar_text(guided: GuidedDecoding) -> str:
    """llguidance's grammar for the request; what plain JSON checks can refuse, refused here."""
    if guided.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_OBJECT_SCHEMA, overrides=JSON_OPTIONS)
    if guided.kind == "json_schema":
        try:
            schema = json.loads(guided.value)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(
                f"{guided.field}: must be JSON text ({error}), got {shown(guided.value)}"
            ) from None
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"{guided.field}: a JSON schema must be a JSON object, got {shown(guided.value)}")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as error:  # llguidance reads JSON numbers as 64-bit: a longer integer is refused
            problem = f"not a JSON schema this server can follow ({error})"
            raise InvalidRequestError(f"{guided.field}: {problem}, got {shown(guided.value)}") from None
    if guided.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(guided.value)
    if guided.kind == "choice":
        # Python's re.escape escapes more than it must, all of it valid in llguidance's (Rust's) regex syntax.
        return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(choice) for choice in choices(guided)))
    raise InvalidRequestError(f"{guided.field}: unknown kind of structured output {guided.kind!r}")


def choices(guided: GuidedDecoding) -> list[str]:
    try:
        listed = json.loads(guided.value)
    except json.JSONDecodeError:
        listed = None
    if not isinstance(listed, list) or not listed or not all(isinstance(choice, str) for choice in listed):
        raise InvalidRequestError(f"{guided.field}: must be a non-empty list of strings, got {shown(guided.value)}")
    return listed


def one_line(error: str) -> str:
    """llguidance's message without its parser state dump, on one line."""
    return " ".join(error.split("<state>")[0].split())


def shown(value: str) -> str:
    return repr(value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "...")
