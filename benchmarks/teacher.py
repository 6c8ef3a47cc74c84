"""`python -m benchmarks.teacher`: teacher generation against an OpenAI-compatible server on 127.0.0.1,
with 4 requests in flight vs 1; prints a table and writes it to benchmarks/teacher_results.md.

The server is `fcapp serve` on the embedded model, run in a background thread of this process; it
decodes concurrent requests together in one batch. The teacher is the real HTTP client
(`OpenAICompatModel`, from the spec `http://127.0.0.1:PORT/v1#MODEL`) driven by `generate()`, with a
fresh SQLite store and a cold prefix cache for every run, on GSM8K and FOL problems. Runs alternate
(1, 4, 1, 4) so that both see the same moments of a shared machine; the faster run of each counts.
3-5 minutes on the 2-core box.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from benchmarks.decode import machine
from benchmarks.report import Row, command, log, table
from fcapp.generate import GenerateConfig, generate
from fcapp.models import get_model
from fcapp.models.local import LocalModel
from fcapp.records import Chain
from fcapp.serve import ServerThread, build_app
from fcapp.store import Store

RESULTS = Path(__file__).with_name("teacher_results.md")
# multi-step GSM8K chains spend their time decoding; FOL chains (long premises, 1-2 short steps) in prefill
TASKS = {"gsm8k": 2, "fol": 2}  # task: problems
SETTINGS = dict(samples=4, max_steps=4, max_new_tokens=48, temperature=0.8)
CONCURRENCY = (1, 4)
ROUNDS = 2


class Counted:
    """The served model, with how many requests it decoded together: after every token of its
    continuous-batching decode, the number of slots holding a request."""

    def __init__(self, model: LocalModel) -> None:
        self.model = model
        self.sizes: list[int] = []

    def __getattr__(self, name: str):  # everything else is the model's
        return getattr(self.model, name)

    def generate_continuous(self, requests, slots: int, stop_when=None) -> Iterator[None]:
        busy: set[int] = set()

        def counted(slot: int, reply):
            request = requests(slot, reply)
            (busy.add if request is not None else busy.discard)(slot)
            return request

        for _ in self.model.generate_continuous(counted, slots, stop_when):
            self.sizes.append(len(busy))
            yield


@dataclass
class Run:
    task: str
    concurrency: int
    seconds: float
    done: int
    correct: int
    failed: int
    batches: list[int]  # requests decoding together, after each token
    chains: dict[tuple[str, int], list] = field(repr=False)

    @property
    def per_min(self) -> float:
        return 60 * self.done / self.seconds


def generation(url: str, served: Counted, task: str, concurrency: int) -> Run:
    """One generation run through the server, from a cold cache into a fresh store."""
    served.model.clear_cache()
    served.sizes = []
    chains: dict[tuple[str, int], list] = {}

    def keep(_stats: object, chain: Chain | None) -> None:
        if chain is not None:
            chains[chain.problem_id, chain.seed] = [s.text for s in chain.steps] + [chain.answer]

    spec = f"{url}#{served.model_id}"
    teacher = get_model(spec, api_key_env=None)
    config = GenerateConfig(task, spec, limit=TASKS[task], concurrency=concurrency, **SETTINGS)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="fcapp-bench-teacher-") as tmp, Store(Path(tmp) / "chains.db") as store:
        began = time.perf_counter()
        stats = generate(config, store, teacher, on_chain=keep)
        seconds = time.perf_counter() - began
    teacher.close()  # type: ignore[attr-defined]
    run = Run(task, concurrency, seconds, stats.done, stats.correct, stats.failed, served.sizes, chains)
    log(f"{task}, concurrency {concurrency}: {run.done} chains in {seconds:.1f} s ({run.per_min:.1f}/min), "
        f"{run.correct} correct, {run.failed} failed, "
        f"{sum(run.batches) / max(len(run.batches), 1):.2f} requests decoding together")
    return run


def run() -> tuple[dict[str, str], list[Row]]:
    info = machine()
    served = Counted(LocalModel())
    runs: list[Run] = []  # in the order taken
    with ServerThread(build_app(served)) as server:  # type: ignore[arg-type]
        log(f"serving {served.model_id} at {server.url}; problems {TASKS}, {SETTINGS}")
        for _ in range(ROUNDS):
            runs += [generation(server.url, served, task, c) for task in TASKS for c in CONCURRENCY]
    info["load average at end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    best = {(task, c): min((r for r in runs if (r.task, r.concurrency) == (task, c)), key=lambda r: r.seconds)
            for task in TASKS for c in CONCURRENCY}

    def rate(selected: list[Run]) -> float:
        return 60 * sum(r.done for r in selected) / sum(r.seconds for r in selected)

    rows = []
    for name, tasks in [*((task, [task]) for task in TASKS), ("all", list(TASKS))]:
        one, four = ([best[task, c] for task in tasks] for c in CONCURRENCY)
        ratio = rate(four) / rate(one)
        measured = f"{rate(four):.1f} vs {rate(one):.1f} chains/min ({sum(r.done for r in four)} chains)"
        if name != "all":
            measured += "; runs in turn (concurrency: time): " + ", ".join(
                f"{r.concurrency}: {r.seconds:.1f} s" for r in runs if r.task == name)
        target, met = ("> 1x", ratio > 1) if name == "all" else ("", None)
        rows.append(Row(f"{name}: teacher chains/min over HTTP, concurrency 4 vs 1", measured, f"{ratio:.2f}x",
                        target, met))
    rows.append(Row("correct chains, concurrency 4 vs 1", "; ".join(
        f"{task} {best[task, 4].correct}/{best[task, 4].done} vs {best[task, 1].correct}/{best[task, 1].done}"
        for task in TASKS) + f" (failed: {sum(r.failed for r in runs)})", ""))
    sizes = [size for r in runs if r.concurrency == 4 for size in r.batches]
    rows.append(Row("requests decoding together on the server, concurrency 4",
                    f"mean {sum(sizes) / len(sizes):.2f}, max {max(sizes)}, over {len(sizes)} tokens", ""))
    same = all(r.chains == next(q for q in runs if q.task == r.task).chains for r in runs)
    rows.append(Row("chains identical in every run of a task (sampling seeded per request)", "yes" if same else "no", ""))
    return info, rows


def render(info: dict[str, str], rows: list[Row]) -> str:
    return table("Teacher generation over HTTP: concurrency 4 vs 1",
                 "Produced by `python -m benchmarks.teacher` (benchmarks/README.md says what it measures): "
                 f"`generate()` with an HTTP teacher against `fcapp serve` on 127.0.0.1; problems {TASKS}, "
                 f"{SETTINGS}. Runs taken in turns; the faster of each counts, and `all` sums them.", info, rows)


if __name__ == "__main__":
    command("python -m benchmarks.teacher", __doc__.splitlines()[0], RESULTS, run, render)
