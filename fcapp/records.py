"""The records every stage shares: a call, a step, a chain, and the events of a running chain.

They sit below everything that uses them (tasks, the agent loop, the store, training sets, the UI),
so none of those has to import the agent loop to read a chain.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Message = dict[str, Any]

FINAL_ANSWER = "final_answer"

# Why a chain ended, in the words people read (the CLI, the app, the job tables).
STOP_WORDS = {"answer": "gave a final answer", "max_steps": "reached the step limit",
              "errors": "too many invalid replies in a row", "running": "stopped before the end"}


def stop_words(stop_reason: str) -> str:
    return STOP_WORDS.get(stop_reason, stop_reason.replace("_", " "))


def fmt_seconds(seconds: float | None) -> str:
    """A duration as people say it: "42 s", "3 min 05 s"."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"

EventKind = Literal["step", "token", "call", "result", "error", "answer", "done"]
"""step: a model reply starts; token: streamed text; call: a parsed call; result / error: what the
call gave; answer: the final answer; done: the chain ended (the event carries it)."""


@dataclass
class Call:
    name: str
    arguments: dict[str, Any]


@dataclass
class Step:
    """One model reply and what came of it."""

    index: int
    text: str
    call: Call | None = None
    result: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    tool_elapsed_s: float = 0.0

    def feedback(self) -> str | None:
        """What the model reads next: the result, the error, or nothing after the final answer."""
        if self.error is not None:
            return f"Error: {self.error}"
        if self.call is not None and self.call.name == FINAL_ANSWER:
            return None
        return self.result


@dataclass
class Chain:
    """A finished (or stopped) reasoning chain, complete enough to store, replay and train on."""

    task: str
    problem_id: str
    question: str
    model_id: str
    prompt: list[Message]
    tools: list[dict[str, Any]]
    seed: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stop_reason: str = "running"
    started_at: float = field(default_factory=time.time)
    elapsed_s: float = 0.0
    reference: bool = False
    verdict: bool | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason != "running"

    def completion_messages(self) -> list[Message]:
        """The assistant / tool turns after the prompt (what DPO's chosen / rejected hold)."""
        messages: list[Message] = []
        for step in self.steps:
            messages.append({"role": "assistant", "content": step.text})
            feedback = step.feedback()
            if feedback is not None:
                messages.append({"role": "tool", "content": feedback})
        return messages

    def messages(self) -> list[Message]:
        return self.prompt + self.completion_messages()

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.steps)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.steps)

    @property
    def valid_calls(self) -> int:
        return sum(1 for s in self.steps if s.call is not None and s.error is None)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["completion_tokens"] = self.completion_tokens
        record["prompt_tokens"] = self.prompt_tokens
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "Chain":
        record = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        steps = []
        for s in record.pop("steps", []):
            call = s.get("call")
            steps.append(Step(**{**s, "call": Call(**call) if call else None}))
        return cls(**record, steps=steps)


@dataclass
class Event:
    """One thing that happened in a running chain, for live display.

    kind: see EventKind.
    """

    kind: EventKind
    step: int
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    chain: Chain | None = None
