"""One small interface for every model backend: chat messages + tool schemas in, streamed text out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

from fcapp.records import Message


class ModelError(RuntimeError):
    """A backend could not produce text (unreachable server, bad model path, ...), said plainly."""


@dataclass
class SamplingParams:
    """How to sample. temperature 0 means greedy; the seed makes sampled runs repeatable."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 192
    seed: int = 0
    stop: list[str] = field(default_factory=list)


Request = tuple[list[Message], SamplingParams]  # a conversation to complete, and how to sample its reply


@dataclass
class Chunk:
    """A piece of streamed output. Counts are running totals where the backend knows them (a
    consumer that stops reading early keeps the latest), and final on the `finished` chunk."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finished: bool = False


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class ChatModel(Protocol):
    """What the agent needs from a model."""

    model_id: str

    def stream(
        self, messages: list[Message], tools: list[dict] | None = None, params: SamplingParams | None = None
    ) -> Iterator[Chunk]:
        """Yield text as it is produced, with running token counts; the last chunk has finished=True."""
        ...


def complete(
    model: ChatModel, messages: list[Message], tools: list[dict] | None = None, params: SamplingParams | None = None
) -> Completion:
    """Drain a stream into one Completion."""
    parts: list[str] = []
    prompt_tokens = completion_tokens = 0
    for chunk in model.stream(messages, tools, params):
        parts.append(chunk.text)
        prompt_tokens = chunk.prompt_tokens or prompt_tokens
        completion_tokens = chunk.completion_tokens or completion_tokens
    return Completion("".join(parts), prompt_tokens, completion_tokens)
