"""One generation on a loaded model: chat template, context-window check, deadline inside the loop."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from domain import Generation, GenerationParams, GenerationTimeoutError, InvalidRequestError, Prompt


@dataclass
class LoadedModel:
    model_id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: str
    dtype: torch.dtype
    load_time_s: float
    memory_bytes: int
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    last_used_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids


class StopWhen(StoppingCriteria):
    """Ends generation at the deadline or when the caller cancels; checked after every decode step."""

    def __init__(self, deadline: float, cancelled: threading.Event | None = None) -> None:
        self.deadline = deadline
        self.cancelled = cancelled or threading.Event()
        self.expired = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.expired = time.monotonic() >= self.deadline
        stop = self.expired or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def encode_prompt(loaded: LoadedModel, prompt: Prompt) -> torch.Tensor:
    text = loaded.tokenizer.apply_chat_template(prompt.to_list(), tokenize=False, add_generation_prompt=True)
    return loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def check_context_window(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    if prompt_tokens + max_new_tokens > loaded.context_length:
        raise InvalidRequestError(
            f"query and context: the prompt is {prompt_tokens} tokens and max_length asks for {max_new_tokens} "
            f"more, past model {loaded.model_id!r}'s context window of {loaded.context_length} tokens; "
            f"shorten the query or the context"
        )


def sampling_arguments(params: GenerationParams) -> dict:
    if params.greedy:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": params.temperature, "top_p": None, "top_k": None}


def generate(loaded: LoadedModel, prompt: Prompt, params: GenerationParams, cancelled: threading.Event | None = None) -> Generation:
    started = time.perf_counter()
    deadline = time.monotonic() + params.timeout_s
    input_ids = encode_prompt(loaded, prompt)
    prompt_tokens = input_ids.shape[1]
    check_context_window(loaded, prompt_tokens, params.max_new_tokens)
    stop = StopWhen(deadline, cancelled)
    eos_ids = loaded.eos_token_ids
    with torch.inference_mode():
        output = loaded.model.generate(
            input_ids=input_ids.to(loaded.device),
            attention_mask=torch.ones_like(input_ids).to(loaded.device),
            max_new_tokens=params.max_new_tokens,
            stopping_criteria=StoppingCriteriaList([stop]),
            pad_token_id=min(eos_ids) if eos_ids else None,
            **sampling_arguments(params),
        )
    if stop.expired:
        raise GenerationTimeoutError(
            f"generation passed MAX_GENERATION_TIME={params.timeout_s:g}s and was stopped; "
            f"ask for fewer tokens (max_length) or raise MAX_GENERATION_TIME"
        )
    new_tokens = output[0, prompt_tokens:].tolist()
    ended_on_eos = bool(new_tokens) and new_tokens[-1] in eos_ids
    completion = [token for token in new_tokens if token not in eos_ids]
    loaded.last_used_at = datetime.now(timezone.utc)
    return Generation(
        text=loaded.tokenizer.decode(completion, skip_special_tokens=True).strip(),
        model_id=loaded.model_id,
        finish_reason="stop" if ended_on_eos or len(new_tokens) < params.max_new_tokens else "length",
        prompt_tokens=prompt_tokens,
        completion_tokens=len(new_tokens),
        generation_time_s=round(time.perf_counter() - started, 4),
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
    )
