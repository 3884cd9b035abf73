"""Incremental detokenization: text deltas from token ids as a sequence generates them, with stop strings."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


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
