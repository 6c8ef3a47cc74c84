"""Several chains advanced in lockstep on one local model.

Each round, the next prompt of every active chain goes into one `generate_batch` call and each reply
is applied with `Agent.advance`, exactly as `Agent.run` applies a streamed one. On a memory-bound CPU
a decode step costs about the same for 8 rows as for 1 (the weights are read once per step), so K
samples of a problem, or several problems, cost little more than one chain.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, Protocol, Sequence

from fcapp.agent import Agent, Chain
from fcapp.calls import call_end
from fcapp.models.base import Completion, Message, SamplingParams
from fcapp.solve import SolveConfig, finish, start_chain
from fcapp.tasks.base import Problem, Task


class BatchModel(Protocol):
    """What lockstep solving needs from a model (LocalModel has it)."""

    model_id: str

    def generate_batch(self, conversations: list[list[Message]], params: list[SamplingParams],
                       stop_when: Callable[[int, str], bool] | None = None) -> list[Completion]: ...


def iter_solve_batch(task: Task, jobs: Sequence[tuple[Problem, SolveConfig]], model: BatchModel,
                     batch_size: int = 8, stop: threading.Event | None = None,
                     ) -> Iterator[tuple[int, Chain | Exception]]:
    """Solve `jobs` with up to `batch_size` chains in flight; yield (job index, verified chain) as each
    chain finishes, so a caller can store it at once. A finished chain's slot goes to the next job at
    the next round. A failed batch call yields (index, exception) for each chain it held. Once `stop`
    is set no further round starts: chains still unfinished are dropped, never yielded half-done."""
    pending = iter(enumerate(jobs))
    active: list[tuple[int, Problem, Agent, Chain]] = []
    while not (stop and stop.is_set()):
        while len(active) < batch_size and (job := next(pending, None)) is not None:
            index, (problem, config) = job
            active.append((index, problem, *start_chain(task, problem, model.model_id, config)))
        if not active:
            return
        names = [agent.tools.names() for _, _, agent, _ in active]
        began = time.perf_counter()
        try:
            replies = model.generate_batch(
                [chain.messages() for _, _, _, chain in active],
                [agent.step_params(chain) for _, _, agent, chain in active],
                lambda row, text: call_end(text, names[row]) is not None,
            )
        except Exception as exc:  # the model failed: every chain of this round failed with it
            for index, *_ in active:
                yield index, exc
            active = []
            continue
        elapsed = time.perf_counter() - began
        still: list[tuple[int, Problem, Agent, Chain]] = []
        for (index, problem, agent, chain), reply in zip(active, replies):
            agent.advance(chain, reply.text, reply.prompt_tokens, reply.completion_tokens,
                          getattr(reply, "elapsed_s", elapsed))
            if not chain.done:
                still.append((index, problem, agent, chain))
                continue
            try:
                outcome: Chain | Exception = finish(task, problem, chain)
            except Exception as exc:  # the verifier failed on this chain alone
                outcome = exc
            yield index, outcome
        active = still


def solve_batch(task: Task, jobs: Sequence[tuple[Problem, SolveConfig]], model: BatchModel,
                batch_size: int = 8) -> list[Chain]:
    """Every job's verified chain, in job order (raises the first failure)."""
    chains: dict[int, Chain] = {}
    for index, outcome in iter_solve_batch(task, jobs, model, batch_size):
        if isinstance(outcome, Exception):
            raise outcome
        chains[index] = outcome
    return [chains[i] for i in range(len(jobs))]
