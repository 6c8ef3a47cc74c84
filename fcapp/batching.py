"""Several chains solved together on one local model, with continuous batching.

The model decodes up to `batch_size` chains at once. The moment a row's reply ends it is applied with
`Agent.advance`, exactly as `Agent.run` applies a streamed one, and the row goes on with its chain's
next prompt (or, once the chain is done, with the next job) inside the same running decode: no row
waits for the longest reply of a round. On a memory-bound CPU a decode step costs little more for 8
rows than for 1 (the weights are read once per step), so K samples of a problem, or several
problems, cost little more than one chain.
"""

from __future__ import annotations

import threading
from contextlib import closing
from typing import Callable, Iterator, Protocol, Sequence

from fcapp.agent import Agent
from fcapp.calls import call_end
from fcapp.models.base import Completion, Request
from fcapp.records import Chain
from fcapp.solve import SolveConfig, finish, for_model, start_chain
from fcapp.tasks.base import Problem, Task


class BatchModel(Protocol):
    """What batched solving needs from a model (LocalModel has it): see
    `LocalModel.generate_continuous` for the contract."""

    model_id: str

    def generate_continuous(self, requests: Callable[[int, Completion | None], Request | None], slots: int,
                            stop_when: Callable[[int, str], bool] | None = None) -> Iterator[None]: ...


def iter_solve_batch(task: Task, jobs: Sequence[tuple[Problem, SolveConfig]], model: BatchModel,
                     batch_size: int = 8, stop: threading.Event | None = None,
                     ) -> Iterator[tuple[int, Chain | Exception]]:
    """Solve `jobs` with up to `batch_size` chains in flight; yield (job index, verified chain) as each
    chain finishes, so a caller can store it at once. A finished chain's slot goes to the next job at
    once. A failed model yields (index, exception) for each chain it held, and the remaining jobs go
    on. Once `stop` is set decoding ends: chains still unfinished are dropped, never yielded half-done."""
    pending = iter(enumerate(jobs))
    active: dict[int, tuple[int, Problem, Agent, Chain]] = {}  # by slot
    finished: list[tuple[int, Chain | Exception]] = []

    def next_request(slot: int, reply: Completion | None) -> Request | None:
        """Apply the slot's reply to its chain; the chain's next prompt, or the next job's first."""
        if reply is not None:
            index, problem, agent, chain = active[slot]
            agent.advance(chain, reply.text, reply.prompt_tokens, reply.completion_tokens,
                          getattr(reply, "elapsed_s", 0.0))
            if chain.done:
                del active[slot]
                try:
                    finished.append((index, finish(task, problem, chain)))
                except Exception as exc:  # the verifier failed on this chain alone
                    finished.append((index, exc))
        if slot not in active:
            if (stop and stop.is_set()) or (job := next(pending, None)) is None:
                return None
            index, (problem, config) = job
            active[slot] = (index, problem, *start_chain(task, problem, model.model_id, for_model(config, model)))
        _, _, agent, chain = active[slot]
        return chain.messages(), agent.step_params(chain)

    def ended(slot: int, text: str) -> bool:
        """A finished call ends the reply: no tokens wasted after it."""
        return call_end(text, active[slot][2].tools.names()) is not None

    def drain() -> Iterator[tuple[int, Chain | Exception]]:
        yield from finished
        finished.clear()

    failed = True
    while failed and not (stop and stop.is_set()):  # a failed model leaves the pending jobs to a new run
        failed = False
        try:
            with closing(model.generate_continuous(next_request, batch_size, ended)) as steps:
                for _ in steps:
                    yield from drain()
                    if stop and stop.is_set():
                        return
        except Exception as exc:  # the model failed: every chain it held failed with it
            finished.extend((index, exc) for index, *_ in active.values())
            active.clear()
            failed = True
        yield from drain()


def solve_batch(task: Task, jobs: Sequence[tuple[Problem, SolveConfig]], model: BatchModel,
                batch_size: int = 8) -> list[Chain]:
    """Every job's verified chain, in job order (raises the first failure)."""
    chains: dict[int, Chain] = {}
    for index, outcome in iter_solve_batch(task, jobs, model, batch_size):
        if isinstance(outcome, Exception):
            raise outcome
        chains[index] = outcome
    return [chains[i] for i in range(len(jobs))]
