"""Scoring labels after a prompt with scoring requests (SamplingRequest.scored): which requests to
make, and each label's log probability over its whole token sequence from their answers.

The first request is the prompt itself, read at its last position for every label's first token.
A label of more tokens needs the logits after each of its tokens but the last, so it needs its own
prompt: the prompt followed by those tokens (its head). Labels with the same head share that
request, which reads each head token past the first, then every last token that follows the head.
Those requests come after the first, whose prompt blocks the prefix cache then holds.

Pure Python: it plans and adds up, the engine runs the requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sequence import ScoredPosition


@dataclass(frozen=True)
class ScoringRequest:
    prompt_ids: list[int]
    scored: tuple[ScoredPosition, ...]


class LabelScoring:
    def __init__(self, prompt_ids: list[int], labels: list[list[int]]) -> None:
        self._labels = labels
        self._last = len(prompt_ids) - 1
        self._firsts = tuple(sorted({tokens[0] for tokens in labels}))
        lasts_after: dict[tuple[int, ...], set[int]] = {}
        for tokens in labels:
            if len(tokens) > 1:
                lasts_after.setdefault(tuple(tokens[:-1]), set()).add(tokens[-1])
        self._lasts_after = {head: tuple(sorted(lasts)) for head, lasts in lasts_after.items()}
        self.first = ScoringRequest(prompt_ids, (ScoredPosition(self._last, self._firsts),))
        self.rest = [self._after_head(prompt_ids, head) for head in self._lasts_after]

    def _after_head(self, prompt_ids: list[int], head: tuple[int, ...]) -> ScoringRequest:
        within = [ScoredPosition(self._last + offset, (head[offset],)) for offset in range(1, len(head))]
        final = ScoredPosition(self._last + len(head), self._lasts_after[head])
        return ScoringRequest(prompt_ids + list(head), (*within, final))

    @property
    def longest_prompt(self) -> int:
        return max(len(request.prompt_ids) for request in (self.first, *self.rest))

    def totals(self, first: tuple[tuple[float, ...], ...], rest: list[tuple[tuple[float, ...], ...]]) -> list[float]:
        """Each label's log probability, from the answers to `first` and to `rest`, in their orders."""
        (first_logprobs,) = first
        logprob_of_first = dict(zip(self._firsts, first_logprobs))
        after_head = dict(zip(self._lasts_after, rest))
        totals = []
        for tokens in self._labels:
            total = logprob_of_first[tokens[0]]
            if len(tokens) > 1:
                head = tuple(tokens[:-1])
                *within, final = after_head[head]
                total += sum(logprobs[0] for logprobs in within)
                total += final[self._lasts_after[head].index(tokens[-1])]
            totals.append(total)
        return totals
