"""Label scoring's plan and sums, against a brute-force sum over each label's tokens, with a made-up
model whose log probability depends on the whole prefix."""

from __future__ import annotations

from engine.core.label_scoring import LabelScoring, ScoringRequest

PROMPT = [5, 6, 7, 8]


def logprob(prefix: tuple[int, ...], token: int) -> float:
    return -((hash(prefix) * 31 + token) % 97) / 10


def answer(request: ScoringRequest) -> tuple[tuple[float, ...], ...]:
    """What the engine answers: at each scored position, each token's log probability after the prefix up to it."""
    return tuple(
        tuple(logprob(tuple(request.prompt_ids[: scored.position + 1]), token) for token in scored.token_ids)
        for scored in request.scored
    )


def brute_force(labels: list[list[int]]) -> list[float]:
    return [sum(logprob(tuple(PROMPT + tokens[:at]), token) for at, token in enumerate(tokens)) for tokens in labels]


def test_one_token_labels_need_only_the_prompt_read_at_its_last_position():
    scoring = LabelScoring(PROMPT, [[10], [11], [12]])

    assert scoring.rest == [] and scoring.first.prompt_ids == PROMPT
    assert [(s.position, s.token_ids) for s in scoring.first.scored] == [(3, (10, 11, 12))]
    assert scoring.totals(answer(scoring.first), []) == brute_force([[10], [11], [12]])


def test_labels_of_more_tokens_sum_every_token_and_share_requests_by_head():
    labels = [[10], [10, 20], [10, 21], [10, 20, 30], [11, 22, 33, 44], [12]]
    scoring = LabelScoring(PROMPT, labels)

    heads = sorted(tuple(request.prompt_ids[len(PROMPT) :]) for request in scoring.rest)
    assert heads == [(10,), (10, 20), (11, 22, 33)]  # [10, 20] and [10, 21] share the head (10,)
    assert scoring.longest_prompt == len(PROMPT) + 3
    totals = scoring.totals(answer(scoring.first), [answer(request) for request in scoring.rest])
    assert totals == brute_force(labels)
    assert totals[1] != totals[2]  # same first token, told apart by the second
