"""Solve one problem of a task with a model: the one entry point the CLI, the app, generation and
evaluation share (task -> tools + demonstration -> agent -> verified chain)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from fcapp.agent import Agent, AgentConfig, demonstration
from fcapp.flags import option
from fcapp.models.base import ChatModel, Message, SamplingParams
from fcapp.records import FINAL_ANSWER, Call, Chain, Event, Step
from fcapp.tasks.base import Problem, Task
from fcapp.tools.base import render_call


@dataclass
class SolveConfig:
    """Chain settings. The paper reports step limits of 10 and 20."""

    max_steps: int = option(10, "step limit of a chain (the paper uses 10 and 20)")
    temperature: float = option(0.0, "sampling temperature (0: greedy)")
    top_p: float = option(1.0, "nucleus of the sampling")
    max_new_tokens: int = option(160, "tokens per model reply")
    seed: int = option(0, "seed of the sampling")
    demo: bool | None = option(None, "the worked demonstration in the prompt; default: as the model's card says")

    def agent_config(self) -> AgentConfig:
        return AgentConfig(self.max_steps, sampling=SamplingParams(self.temperature, self.top_p, self.max_new_tokens))


@lru_cache(maxsize=None)
def _demo(task: Task) -> tuple[Message, ...]:
    problem, calls = task.demonstration()
    return tuple(demonstration(task.tools(problem), problem.question, calls))


def prompted_with_demo(model_path: str | None) -> bool:
    """Whether the model in `model_path` is prompted with the worked demonstration: yes, unless its
    training card (beside a tuned model's folder) records that it was trained without one. Evaluation
    and serving then prompt a tuned model the way it was trained."""
    if not model_path:
        return True
    try:
        card = json.loads((Path(model_path).parent / "card.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    prompt = card.get("prompt") if isinstance(card, dict) else None
    return bool(prompt.get("demo", True)) if isinstance(prompt, dict) else True


def for_model(config: SolveConfig | None, model: object) -> SolveConfig:
    """`config` with `demo` settled for `model` (its own setting wins when given)."""
    config = config or SolveConfig()
    if config.demo is not None:
        return config
    return dataclasses.replace(config, demo=prompted_with_demo(getattr(model, "path", None)))


def build_agent(task: Task, problem: Problem, config: SolveConfig | None = None) -> Agent:
    """The agent for `problem`: its task's tools, the task's worked example (unless config.demo is
    False), the chain settings."""
    from fcapp.user_tools import tools_for  # built-in tools + the user functions switched on for the task

    config = config or SolveConfig()
    demo = list(_demo(task)) if config.demo is not False else []
    return Agent(tools_for(task, problem), demo, config.agent_config())


def start_chain(task: Task, problem: Problem, model_id: str, config: SolveConfig | None = None) -> tuple[Agent, Chain]:
    config = config or SolveConfig()
    agent = build_agent(task, problem, config)
    return agent, agent.start(task.name, problem.id, problem.question, model_id, config.seed)


def finish(task: Task, problem: Problem, chain: Chain) -> Chain:
    """Attach the verifier's verdict (None when the problem has no ground truth)."""
    chain.verdict = task.verify(problem, chain.answer) if problem.answer else None
    return chain


def solve_events(task: Task, problem: Problem, model: ChatModel, config: SolveConfig | None = None) -> Iterator[Event]:
    """Stream a chain's events; the final `done` event carries the verified chain."""
    agent, chain = start_chain(task, problem, model.model_id, for_model(config, model))
    for event in agent.run(model, chain):
        if event.kind == "done":
            finish(task, problem, chain)
        yield event


def solve(task: Task, problem: Problem, model: ChatModel, config: SolveConfig | None = None) -> Chain:
    chain: Chain | None = None
    for event in solve_events(task, problem, model, config):
        chain = event.chain or chain
    assert chain is not None
    return chain


def reference_chain(task: Task, problem: Problem) -> Chain | None:
    """The problem's known-correct chain (GSM8K annotations, solver-built FOL chains), verified."""
    calls = task.reference_calls(problem)
    if calls is None:
        return None
    agent, chain = start_chain(task, problem, "reference")
    agent.replay(chain, calls)
    return finish(task, problem, chain)


def edit_final_answer(record: dict, answer: str) -> Chain:
    """A stored chain with its final answer corrected by a person, re-verified against the ground truth.

    The answer must have the task's form (Task.check_answer: a number for GSM8K, True / False / Unknown
    for logic; ValueError otherwise). The last final_answer step gets the new argument (or one is
    appended); verdict is None for a problem without ground truth."""
    from fcapp.tasks import get_task

    chain = Chain.from_dict(record)
    task = get_task(chain.task)
    answer = task.check_answer(answer)
    text = render_call(FINAL_ANSWER, {"answer": answer})
    last = chain.steps[-1] if chain.steps else None
    if last is not None and last.call is not None and last.call.name == FINAL_ANSWER:
        last.call.arguments = {"answer": answer}
        last.text, last.result, last.error = text, f"Final answer: {answer}", None
    else:
        chain.steps.append(Step(len(chain.steps), text, Call(FINAL_ANSWER, {"answer": answer}), f"Final answer: {answer}"))
    chain.answer, chain.stop_reason, chain.verdict = answer, "answer", None
    try:
        problem = task.get(chain.problem_id)
    except KeyError:  # a typed-in problem: nothing to verify against
        return chain
    return finish(task, problem, chain)
