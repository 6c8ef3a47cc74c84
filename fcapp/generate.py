"""Teacher generation (stage 3 of the paper): K sampled chains per problem, each verified against the
ground truth and committed to the store the moment it finishes.

Resumable by construction: every planned chain has a generation key (task, problem, model, seed,
sample, settings); a re-run skips keys already stored, so a crash or Ctrl-C loses nothing finished
and redoes nothing.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal

from fcapp.batching import iter_solve_batch
from fcapp.flags import option
from fcapp.models import SPEC_HELP
from fcapp.models.base import ChatModel
from fcapp.models.registry import EMBEDDED
from fcapp.records import Chain
from fcapp.solve import SolveConfig, reference_chain, solve
from fcapp.store import Store, chain_key
from fcapp.tasks import get_task
from fcapp.tasks.base import Problem, Task


@dataclass
class GenerateConfig:
    task: str = option(dataclasses.MISSING, "the task whose problems are solved")
    teacher: str = option(EMBEDDED, f"the model that writes the chains: {SPEC_HELP}")
    samples: int = option(4, "chains per problem (K)")
    limit: int | None = option(None, "first N problems of the split")
    split: Literal["train", "heldout", "all"] = option("train", "which problems (pairs and training sets never take "
                                                                "held-out ones)")
    temperature: float = option(0.8, "sampling temperature")
    top_p: float = option(0.95, "nucleus of the sampling")
    max_steps: int = option(10, "step limit of a chain")
    max_new_tokens: int = option(160, "tokens per model reply")
    concurrency: int = option(1, "requests in flight (HTTP teachers)")
    seed: int = option(0, "seed of sample 0 (sample k uses seed + k)")
    reference: bool = option(False, "also store the problems' reference chains, marked as such")
    batch_size: int | None = option(None, "local teacher: chains decoded together; default: the K samples of a "
                                          "problem")
    demo: bool | None = option(None, "the worked demonstration in the prompt; default: as the teacher's card says")

    def solve_config(self, sample: int) -> SolveConfig:
        return SolveConfig(max_steps=self.max_steps, temperature=self.temperature, top_p=self.top_p,
                           max_new_tokens=self.max_new_tokens, seed=self.seed + sample, demo=self.demo)


@dataclass
class Job:
    problem: Problem
    sample: int
    key: str


@dataclass
class GenerateStats:
    planned: int = 0
    skipped: int = 0  # already in the store from an earlier run
    skipped_correct: int = 0  # of those, the ones verified correct
    done: int = 0
    correct: int = 0
    failed: int = 0
    references: int = 0
    started: float = field(default_factory=time.time)
    errors: list[str] = field(default_factory=list)

    @property
    def chains_per_min(self) -> float:
        return 60 * self.done / max(time.time() - self.started, 1e-9)

    @property
    def correct_rate(self) -> float:
        return self.correct / self.done if self.done else 0.0

    def summary(self) -> dict:
        return asdict(self) | {"chains_per_min": round(self.chains_per_min, 2), "correct_rate": round(self.correct_rate, 3)}


def select_problems(task: Task, split: str, limit: int | None) -> list[Problem]:
    problems = task.split(split)
    return problems[:limit] if limit else problems


def plan(config: GenerateConfig, model_id: str, store: Store) -> tuple[list[Job], list[bool | None]]:
    """The chains still to generate, and the verdicts of the planned chains already stored."""
    task = get_task(config.task)
    settings = asdict(config.solve_config(0)) | {"seed": config.seed}
    if settings.pop("demo") is False:  # prompted without the demonstration: other chains than the default's
        settings["demo"] = False
    existing = store.stored_verdicts(task.name, model_id)
    jobs, stored = [], []
    for problem in select_problems(task, config.split, config.limit):
        for sample in range(config.samples):
            key = chain_key(task.name, problem.id, model_id, config.seed + sample, settings, sample)
            if key in existing:
                stored.append(existing[key])
            else:
                jobs.append(Job(problem, sample, key))
    return jobs, stored


def add_references(task: Task, problems: list[Problem], store: Store) -> int:
    """Store each problem's verified reference chain (idempotent)."""
    added = 0
    for problem in problems:
        chain = reference_chain(task, problem)
        if chain is not None and chain.verdict:
            store.add_chain(chain, chain.verdict, role="reference")
            added += 1
    return added


def generate(
    config: GenerateConfig,
    store: Store,
    model: ChatModel,
    on_chain: Callable[[GenerateStats, Chain | None], None] | None = None,
    stop: threading.Event | None = None,
) -> GenerateStats:
    """Run the plan; `on_chain` is called after each stored chain (for progress bars / live plots)."""
    task = get_task(config.task)
    problems = select_problems(task, config.split, config.limit)
    store.add_problems(problems)
    jobs, stored = plan(config, model.model_id, store)
    stats = GenerateStats(planned=len(jobs), skipped=len(stored), skipped_correct=sum(map(bool, stored)))
    if config.reference:
        stats.references = add_references(task, problems, store)
    stop = stop or threading.Event()

    def run(job: Job) -> Chain:
        return solve(task, job.problem, model, config.solve_config(job.sample))

    if hasattr(model, "generate_continuous"):  # a local model: decode several chains in one batch
        outcomes = _run_batched(task, jobs, config, model, stop)
    else:
        outcomes = _run_jobs(jobs, run, max(1, config.concurrency), stop)
    for job, outcome in outcomes:
        if not isinstance(outcome, BaseException):
            try:
                store.add_chain(outcome, outcome.verdict, key=job.key, sample=job.sample, role="teacher")
            except Exception as exc:  # noqa: BLE001 - one chain that cannot be stored must not end the run
                outcome = RuntimeError(f"not stored: {type(exc).__name__}: {exc}")
        if isinstance(outcome, BaseException):
            stats.failed += 1
            stats.errors.append(f"{job.problem.id}#{job.sample}: {outcome}")
            if on_chain:
                on_chain(stats, None)
            continue
        stats.done += 1
        stats.correct += bool(outcome.verdict)
        if on_chain:
            on_chain(stats, outcome)
    return stats


def _run_batched(task: Task, jobs: list[Job], config: GenerateConfig, model: ChatModel,
                 stop: threading.Event) -> Iterator[tuple[Job, Chain | BaseException]]:
    """Yield (job, chain or exception) as each finishes, several chains decoded together (continuous batching)."""
    work = [(job.problem, config.solve_config(job.sample)) for job in jobs]
    batch = max(1, config.batch_size or config.samples)
    for index, outcome in iter_solve_batch(task, work, model, batch, stop):  # type: ignore[arg-type]
        yield jobs[index], outcome


def _run_jobs(jobs: list[Job], run: Callable[[Job], Chain], concurrency: int,
              stop: threading.Event) -> Iterator[tuple[Job, Chain | BaseException]]:
    """Yield (job, chain or exception) as each finishes, at most `concurrency` in flight."""
    pending = iter(jobs)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="generate") as pool:
        in_flight: dict[Future, Job] = {}
        while True:
            while not stop.is_set() and len(in_flight) < concurrency:
                job = next(pending, None)
                if job is None:
                    break
                in_flight[pool.submit(run, job)] = job
            if not in_flight:
                return
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                job = in_flight.pop(future)
                error = future.exception()
                yield job, error if error is not None else future.result()
