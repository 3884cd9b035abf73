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


def _byte_of_character() -> dict[str, int]:
    """The inverse of byte-level BPE's table (GPT-2's bytes_to_unicode): which byte each of its
    printable characters stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in characters:
            characters[byte] = chr(256 + shifted)
            shifted += 1
    return {character: byte for byte, character in characters.items()}


BYTE_OF_CHARACTER = _byte_of_character()


class TokenTexts:
    """Each token's own text and UTF-8 bytes, as log probabilities report them. A byte-level BPE token
    (Llama 3, Qwen2, SmolLM2) may hold part of a character: its bytes are exact, and its text shows
    the missing part as U+FFFD."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._known: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        known = self._known.get(token_id)
        if known is None:
            known = self._known[token_id] = self._text_and_bytes(token_id)
        return known

    def _text_and_bytes(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if token_id in self._tokenizer.all_special_ids or piece is None:
            text = piece or ""
            return text, tuple(text.encode())
        if all(character in BYTE_OF_CHARACTER for character in piece):
            raw = bytes(BYTE_OF_CHARACTER[character] for character in piece)
            return raw.decode("utf-8", errors="replace"), tuple(raw)
        text = self._tokenizer.decode([token_id])  # other vocabularies (SentencePiece) decode token by token
        return text, tuple(text.encode())
