from __future__ import annotations

from .generation import ChatMessage, Prompt

DEFAULT_SYSTEM_PROMPT = (
    "You are a precise content-analysis assistant. Answer briefly and use the context when it is relevant."
)


class PromptBuilder:
    """Turns a query and the passages retrieved for it into chat messages for the model's template."""

    def __init__(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
        self._system_prompt = system_prompt

    def build(self, query: str, context: list[str]) -> Prompt:
        messages = []
        if self._system_prompt:
            messages.append(ChatMessage("system", self._system_prompt))
        messages.append(ChatMessage("user", self._user_message(query, context)))
        return Prompt(tuple(messages))

    @staticmethod
    def _user_message(query: str, context: list[str]) -> str:
        passages = [passage.strip() for passage in context if passage.strip()]
        if not passages:
            return query
        numbered = "\n".join(f"[{number}] {passage}" for number, passage in enumerate(passages, start=1))
        # The query comes first: requests that share an instruction then share a prompt prefix,
        # whose KV cache the engine computes once.
        return f"{query}\n\nContext:\n{numbered}"
