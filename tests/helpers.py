"""Builders shared by tests: real chains from real tasks and tools, no model needed."""

from __future__ import annotations

from fcapp.records import Call, Chain
from fcapp.solve import finish, reference_chain, start_chain
from fcapp.tasks import get_task


def correct_chain(task_name: str, problem_id: str) -> Chain:
    """The problem's reference chain (verified correct)."""
    task = get_task(task_name)
    chain = reference_chain(task, task.get(problem_id))
    assert chain is not None and chain.verdict
    return chain


def wrong_chain(task_name: str, problem_id: str, answer: str = "-1", model_id: str = "teacher", seed: int = 0) -> Chain:
    """A chain that calls the right kind of function but ends on a wrong answer (verified incorrect)."""
    task = get_task(task_name)
    problem = task.get(problem_id)
    agent, chain = start_chain(task, problem, model_id)
    chain.seed = seed
    calls = list(task.reference_calls(problem) or [])[:1] + [Call("final_answer", {"answer": answer})]
    agent.replay(chain, calls)
    chain.reference = False
    finish(task, problem, chain)
    assert chain.verdict is False
    return chain
