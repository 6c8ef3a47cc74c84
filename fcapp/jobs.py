"""Background jobs of a long-lived process (the app): teacher generation and evaluation run in threads of
the server, take turns with live solves for the one model slot, and stay in a registry that any page
(one opened after the starting page was reloaded or closed) finds them in again.

A training run is not a job here: it has a worker process and a run folder of its own (fcapp.training).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

ACTIVE = ("waiting", "running", "stopping")
RECENT = 50  # rows a job keeps for its live table


class JobStopped(Exception):
    """The job was asked to stop before it got the model slot."""


class ModelSlot:
    """One model-using run at a time on this machine's cores (live solves, comparisons, generation and
    evaluation take turns instead of sharing two cores). A plain lock, so a streaming handler may take it
    in one thread and give it back from another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: tuple[str, float] | None = None

    def take(self, what: str, timeout: float = 0.5) -> bool:
        """Take the slot for `what` within `timeout` seconds; False when it is still held by another run."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._holder = (what, time.monotonic())
        return True

    def release(self) -> None:
        self._holder = None
        self._lock.release()

    @contextmanager
    def held(self, what: str, stop: threading.Event | None = None) -> Iterator[None]:
        """Hold the slot while the block runs, waiting for it first; JobStopped when `stop` is set while waiting."""
        while not self.take(what):
            if stop is not None and stop.is_set():
                raise JobStopped(what)
        try:
            yield
        finally:
            self.release()

    def holder(self) -> str | None:
        """What holds the slot, and for how long, in words; None when it is free."""
        holder = self._holder
        if holder is None:
            return None
        return f"{holder[0]} ({int(time.monotonic() - holder[1])} s)"


SLOT = ModelSlot()


@dataclass
class Job:
    """A background job as its pages see it: progress in plain words, its latest rows, a stop switch."""

    id: int
    kind: str
    title: str
    settings: dict[str, Any]
    who: str = ""
    status: str = "waiting"  # waiting (for the model slot), running, stopping, finished, stopped, failed
    done: int = 0
    total: int = 0
    note: str = "waiting for the model"
    error: str | None = None
    result: Any = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT))  # newest first
    stop_event: threading.Event = field(default_factory=threading.Event)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def stop(self) -> None:
        """Ask the job to end after the work in flight; what it finished is kept."""
        self.stop_event.set()
        if self.active:
            self.status = "stopping"

    def progress(self, done: int, total: int, note: str, row: dict[str, Any] | None = None) -> None:
        self.done, self.total, self.note = done, total, note
        if row is not None:
            self.recent.appendleft(row)
        if self.status == "waiting":
            self.status = "running"

    def elapsed_s(self) -> float:
        return (self.ended or time.time()) - self.started


_jobs: dict[int, Job] = {}
_jobs_lock = threading.Lock()
_ids = itertools.count(1)


def start(kind: str, title: str, settings: dict[str, Any], work: Callable[[Job], tuple[str, Any]],
          who: str = "") -> Job:
    """Run `work(job)` in a thread of this process; it returns (closing note, result). One active job per
    kind: a second is refused with RuntimeError naming the running one."""
    with _jobs_lock:
        running = next((j for j in _jobs.values() if j.kind == kind and j.active), None)
        if running is not None:
            raise RuntimeError(f"a {kind} job is already running ({running.title}, started by "
                               f"{running.who or 'someone'} {int(running.elapsed_s())} s ago): follow it or stop it")
        job = Job(next(_ids), kind, title, settings, who)
        _jobs[job.id] = job

    def run() -> None:
        try:
            job.note, job.result = work(job)
            job.status = "stopped" if job.stop_event.is_set() else "finished"
        except JobStopped:
            job.status, job.note = "stopped", "stopped while waiting for the model: nothing was run"
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason shown; the app goes on
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            job.note = f"failed: {exc}"
        job.ended = time.time()

    threading.Thread(target=run, daemon=True, name=f"job-{kind}-{job.id}").start()
    return job


def get(job_id: int | None) -> Job | None:
    return _jobs.get(job_id) if job_id is not None else None


def latest(kind: str) -> Job | None:
    """The active job of `kind`, else the newest one; None when there has been none in this process."""
    with _jobs_lock:
        of_kind = [j for j in _jobs.values() if j.kind == kind]
    return next((j for j in of_kind if j.active), None) or max(of_kind, key=lambda j: j.id, default=None)


def active() -> list[Job]:
    with _jobs_lock:
        return [j for j in _jobs.values() if j.active]


# ---- the two kinds the app runs ---------------------------------------------------------------------------
def start_generation(config: Any, store: Any, load_model: Callable[[str], Any], who: str = "") -> Job:
    """A teacher generation job (fcapp.generate.generate) over `store`; each finished chain becomes a row of
    the job's live table. `load_model(spec)` gives the teacher (the app's cached models)."""
    from fcapp.generate import generate, plan
    from fcapp.records import stop_words

    def work(job: Job) -> tuple[str, Any]:
        with SLOT.held(f"Generation: {config.task} with {config.teacher}", job.stop_event):
            job.progress(0, 0, f"loading {config.teacher}")
            model = load_model(config.teacher)
            total = len(plan(config, model.model_id, store)[0])
            job.progress(0, total, f"0 of {total} chains")

            def on_chain(stats: Any, chain: Any) -> None:
                row = None if chain is None else {
                    "problem": chain.problem_id, "verifier": {True: "✓", False: "✗", None: "–"}[chain.verdict],
                    "steps": len(chain.steps), "answer": chain.answer or "", "ended": stop_words(chain.stop_reason)}
                job.progress(stats.done + stats.failed, total,
                             f"{stats.done} of {total} chains, {stats.correct} correct, "
                             f"{stats.chains_per_min:.1f} a minute" + (f", {stats.failed} failed" if stats.failed else ""),
                             row)

            stats = generate(config, store, model, on_chain=on_chain, stop=job.stop_event)
        ended = "stopped" if job.stop_event.is_set() else "finished"
        note = (f"{ended}: {stats.done} new chains ({stats.correct} correct), {stats.skipped} already stored "
                f"({stats.skipped_correct} correct)"
                + (f", {stats.references} reference chains" if stats.references else "")
                + (f", {stats.failed} failed ({stats.errors[0]})" if stats.failed else "")
                + ("; every finished chain is stored" if ended == "stopped" else ""))
        return note, stats.summary()

    title = f"{config.task}: {config.samples} samples x {config.limit or 'all'} problems with {config.teacher}"
    return start("generation", title, dict(vars(config)), work, who)


def start_evaluation(config: Any, store: Any, load_model: Callable[[str], Any], who: str = "") -> Job:
    """An evaluation job (fcapp.evaluate.evaluate, stored in `store`); its result is the evaluation."""
    from fcapp.evaluate import evaluate

    def work(job: Job) -> tuple[str, Any]:
        with SLOT.held(f"Evaluation: {config.task}, {' vs '.join(config.models)}", job.stop_event):
            job.progress(0, 0, "loading the models")
            models = {spec: load_model(spec) for spec in config.models}
            try:
                result = evaluate(config, store, stop=job.stop_event, models=models,
                                  on_progress=lambda done, total, name: job.progress(
                                      done, total, f"{done} of {total} chains ({name})"))
            except InterruptedError:
                return f"stopped after {job.done} of {job.total} chains: nothing is stored", None
        return f"finished: {result['n']} problems, evaluation #{result.get('eval_id')}", result

    title = f"{config.task}: {' vs '.join(config.models)} on {config.limit} {config.split} problems"
    return start("evaluation", title, dict(vars(config)), work, who)
