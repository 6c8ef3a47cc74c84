"""Training runs seen from outside their worker: start one, follow it, stop it, find it again.

`start_training(config)` checks everything it can before a process starts (the config, the base model,
the data: a broken or held-out-holding file fails at once, naming file and line), builds the training
set from the store when the config names a task instead of a file, then runs
`python -m fcapp.training.worker --config <out>/config.json` in its own process group. `attach(name)`
reconnects to a run (after a page reload) from its folder; `list_runs()` reads every run folder, so runs
started from the CLI and from the app show up alike.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fcapp.paths import models_dir, safe_name
from fcapp.training.config import TERMINAL, TrainConfig
from fcapp.files import atomic_write_json
from fcapp.training.folder import now, read_json, read_log
from fcapp.records import fmt_seconds

_CHILDREN: dict[Path, subprocess.Popen] = {}  # workers this process started, so attach() can reap them


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
            return "\n".join(handle.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return ""


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by signal {name}" + (" (out of memory, or killed by hand)" if name == "SIGKILL" else "")
    return f"exited with code {code}"


def _pid_state(pid: int) -> tuple[bool, int | None]:
    """(alive, exit code if known) of a worker this process may not have started."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)  # reaps it when it is our child
        return (True, None) if done == 0 else (False, os.waitstatus_to_exitcode(status))
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return (stat.rsplit(")", 1)[1].split()[0] != "Z" and b"fcapp.training" in cmdline), None
    except OSError:
        if not Path("/proc").is_dir():  # no procfs: best effort
            try:
                os.kill(pid, 0)
                return True, None
            except OSError:
                pass
        return False, None


class TrainingJob:
    """A training run seen from outside its worker: status, log, stop. Safe to poll from a UI."""

    def __init__(self, out_dir: str | Path, process: subprocess.Popen | None = None) -> None:
        self.out = Path(out_dir)
        self.process = process
        self.status_path, self.log_path = self.out / "status.json", self.out / "log.jsonl"
        self.worker_log = self.out / "worker.log"

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return (read_json(self.status_path) or {}).get("pid")

    @property
    def returncode(self) -> int | None:
        if self.process is not None:
            return self.process.poll()
        return (read_json(self.status_path) or {}).get("returncode")

    @property
    def config(self) -> dict[str, Any]:
        """The run's settings, as the worker got them."""
        return read_json(self.out / "config.json") or {}

    @property
    def card(self) -> dict[str, Any]:
        return read_json(self.out / "card.json") or {}

    def _exit(self) -> tuple[bool, int | None]:
        if self.process is not None:
            code = self.process.poll()
            return code is None, code
        pid = self.pid
        return _pid_state(pid) if pid else (False, None)

    def poll(self) -> dict[str, Any]:
        """The status record: status (starting/running/finished/stopped/failed), error, stage, step,
        max_steps, eta_s, pid ... A worker that died without reporting (SIGKILL, OOM, crash) becomes
        "failed" with the cause and the last lines of worker.log, written back so a later attach sees it."""
        info = read_json(self.status_path) or {"status": "starting"}
        if info["status"] in TERMINAL:
            if self.process is not None:
                info["returncode"] = self.process.poll()
            return info
        alive, code = self._exit()
        if alive:
            return info
        info = read_json(self.status_path) or info  # it may have reported just before exiting
        if info["status"] in TERMINAL:
            return info | {"returncode": code}
        cause = _describe_exit(code) if code is not None else "ended without reporting (killed or crashed)"
        info |= {"status": "failed", "returncode": code, "updated": now(),
                 "error": f"training worker (pid {self.pid}) {cause}", "log_tail": _log_tail(self.worker_log)}
        atomic_write_json(self.status_path, info)
        return info

    def read_log(self) -> list[dict[str, Any]]:
        """Every logged step so far; each line's `stage` says what it belongs to (warmup, sft, dpo, grpo, round)."""
        return read_log(self.log_path)

    def worker_output(self, lines: int = 200) -> str:
        """The last lines the worker printed (warnings, tracebacks)."""
        return _log_tail(self.worker_log, lines)

    def wait(self, timeout: float | None = None, interval: float = 0.5) -> dict[str, Any]:
        """Poll until the run has ended and its worker exited, or `timeout` seconds pass; returns the
        last status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.poll()
            if info["status"] in TERMINAL and not self._exit()[0]:
                return self.poll()
            if deadline is not None and time.monotonic() >= deadline:
                return info
            time.sleep(interval)

    def stop(self, timeout: float = 120.0, grace: float = 15.0) -> dict[str, Any]:
        """Ask the worker to stop after its current step (it saves a checkpoint and the model); after
        `timeout` s send SIGTERM, after `grace` more SIGKILL (then nothing since the last checkpoint is kept)."""
        info = self.poll()
        if info["status"] in TERMINAL:
            return info
        (self.out / "STOP").touch()
        info = self.wait(timeout)
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if info["status"] in TERMINAL or self.pid is None:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            info = self.wait(wait_s)
        if info["status"] == "failed" and info.get("returncode") == -signal.SIGKILL:
            info |= {"status": "stopped", "error": f"did not stop within {timeout + grace:.0f} s and was killed; "
                                                   "only the last checkpoint is kept"}
            atomic_write_json(self.status_path, info)
        return info


# ---- before a worker starts -------------------------------------------------------------------------------
# Seconds of training per row with the defaults on the idle 2-core CPU box: a pair (dpo), an example (sft),
# a sampled chain (grpo). From benchmarks/training_results.md (python -m benchmarks.training, 2026-12-01).
# The preview's time is an estimate from these: another machine, a busy one or other settings differ.
SECONDS_PER_ROW = {"dpo": 8.07, "sft": 2.95, "grpo": 6.59}
SECONDS_PER_ROW_SOURCE = "benchmarks/training_results.md, idle 2-core CPU box, 2026-12-01"


def build_data(config: TrainConfig, store: Any, target: Path) -> dict[str, Any]:
    """Write the training set of a config without --data from the store: SFT examples (sft, from
    `sources`), the stored pair set `pair_set`, or pairs built from the chains (dpo), of training problems
    only. Returns the set's card; TrainingDataError when it would be empty, saying what to do."""
    from fcapp.trainsets import PairPolicy, TrainingDataError, build_pairs, export_rows, make_examples

    if config.method == "sft":
        return make_examples(store, config.tasks, target, tuple(config.sources))
    if config.pair_set:
        tasks = (*config.tasks, "unknown")  # an imported row without a task is stored under "unknown"
        rows = [row for row in store.list_pairs(policy=config.pair_set) if not config.tasks or row["task"] in tasks]
        if not rows:
            stored = ", ".join(store.pair_sets()) or "none"
            raise TrainingDataError(f"pair set {config.pair_set!r} holds no pairs"
                                    + (f" of {config.task}" if config.task else "") + f" (stored pair sets: {stored})")
    else:
        rows = [row for task in config.tasks for row in build_pairs(store, task, PairPolicy())]
    if not rows:
        raise TrainingDataError(f"no preference pairs for {config.task} yet: a pair needs a training problem with a "
                                "correct and an incorrect chain (generate chains, or label some)")
    export_rows(rows, target, "pairs", {"tasks": config.tasks, "pairs": len(rows), "pair_set": config.pair_set})
    return {"pairs": len(rows)}


def _settle_base(config: TrainConfig) -> None:
    """Check the base model exists, and settle whether the training prompt holds the demonstration."""
    from fcapp.models.base import ModelError
    from fcapp.models.registry import resolve_model_path, split_precision

    model, precision = split_precision(config.base)
    if precision != "fp32":
        raise ValueError(f"base model {config.base!r}: training takes the fp32 weights; {precision} is a decoding "
                         f"precision: train {model!r} and decode it with '@{precision}'")
    try:
        base = resolve_model_path(config.base)
    except ModelError as exc:
        raise ValueError(f"base model {config.base!r}: {exc}") from None
    if not (Path(base) / "config.json").is_file():
        raise ValueError(f"base model {config.base!r}: not the embedded model (smollm2), a tuned model "
                         "(fcapp models) or a model folder with a config.json")
    if config.demo is None:  # prompted as the base model is
        from fcapp.solve import prompted_with_demo

        config.demo = prompted_with_demo(base)


def validate(config: TrainConfig) -> dict[str, Any]:
    """Everything checkable before a worker starts: the base model, the task, the data file (rows,
    held-out problems, lengths). Returns a summary: rows in the file and rows that will be used."""
    _settle_base(config)
    if config.method in ("grpo", "rounds"):
        from fcapp.tasks import get_task

        for name in config.tasks:
            if not get_task(name).split("train"):
                raise ValueError(f"task {name} has no training problems")
        return {"task": config.task}
    from fcapp.training import dpo, sft
    from fcapp.training.common import load_tokenizer
    from fcapp.trainsets import read_training_file

    tokenizer = load_tokenizer(config.base)
    if config.method == "sft":
        rows = read_training_file(str(config.data), "sft")
        used = len(sft.tokenized_examples(rows, tokenizer, config))
    else:
        rows = read_training_file(str(config.data), "pairs")
        used = len(dpo.fitting_pairs(rows, tokenizer, config))
    return {"path": config.data, "rows": len(rows), "used": used}


def _steps(config: TrainConfig, rows: int) -> int:
    per_step = config.batch_size * config.grad_accum
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.epochs * math.ceil(rows / per_step))) if rows else 0


def preview(config: TrainConfig, store: Any = None) -> dict[str, Any]:
    """What a run of `config` would train on, without starting it or writing anything it keeps: the rows
    (built from the store exactly as start_training builds them, or read from --data with the same checks),
    the problems and tasks they come from, each row's token length against max_length, the optimizer steps,
    and an estimate of the training time from SECONDS_PER_ROW. A set that cannot be trained on raises
    TrainingDataError / ValueError with the reason, as start_training would."""
    import tempfile

    from fcapp.training import dpo, sft
    from fcapp.training.common import load_tokenizer
    from fcapp.trainsets import heldout_guard, read_training_file

    config = TrainConfig.from_dict(config.to_dict())  # settling the base must not change the caller's config
    _settle_base(config)
    facts: dict[str, Any] = {"method": config.method, "max_length": config.max_length, "lengths": [],
                             "too_long": 0, "drop_too_long": config.drop_too_long,
                             "estimate_basis": SECONDS_PER_ROW_SOURCE}
    if config.method in ("grpo", "rounds"):
        from fcapp.tasks import get_task

        guard = heldout_guard()
        problems = [p for name in config.tasks for p in get_task(name).split("train")[: config.limit or None]
                    if not guard.refuses(name, p.id, p.question)]
        steps = config.max_steps if config.max_steps > 0 else math.ceil(
            config.epochs * math.ceil(len(problems) / config.grad_accum))
        chains = steps * config.grad_accum * config.num_generations
        return facts | {"kind": "problems", "source": f"the training problems of {config.task}", "rows": len(problems),
                        "used": len(problems), "problems": len(problems), "heldout": 0, "steps": steps,
                        "tasks": {name: sum(p.task == name for p in problems) for name in config.tasks},
                        "estimate_s": None if config.method == "rounds" else chains * SECONDS_PER_ROW["grpo"],
                        "rows_trained": chains, "row_word": "problems", "trained_word": "sampled chains"}
    kind = "sft" if config.method == "sft" else "pairs"
    with tempfile.TemporaryDirectory(prefix="fcapp-preview-") as scratch:
        path = Path(config.data) if config.data else Path(scratch) / "data.jsonl"
        if not config.data:
            from fcapp.store import Store

            build_data(config, store or Store(), path)
        rows = read_training_file(path, kind)
    tokenizer = load_tokenizer(config.base)
    if kind == "sft":
        lengths = [tokens.length for tokens in sft.example_tokens(rows, tokenizer, config)]
    else:
        lengths = dpo.pair_lengths(rows, tokenizer, config)[1]
    too_long = sum(n > config.max_length for n in lengths)
    used = len(rows) - too_long if config.drop_too_long or not too_long else 0
    steps = _steps(config, used)
    trained = steps * config.batch_size * config.grad_accum
    source = (str(config.data) if config.data else f"pair set {config.pair_set}" if config.pair_set
              else f"pairs built from the {config.task} chains" if kind == "pairs"
              else f"the correct {config.task} chains ({', '.join(config.sources)})")
    return facts | {
        "kind": kind, "source": source, "rows": len(rows), "used": used, "lengths": lengths, "too_long": too_long,
        "problems": len({(row.get("task"), row.get("problem_id")) for row in rows}), "heldout": 0,
        "tasks": {task: sum(str(row.get("task")) == task for row in rows) for task in sorted({str(row.get("task")) for row in rows})},
        "steps": steps, "rows_trained": trained, "row_word": "pairs" if kind == "pairs" else "examples",
        "trained_word": "pairs" if kind == "pairs" else "examples",
        "estimate_s": trained * SECONDS_PER_ROW[config.method],
    }


def render_preview(facts: dict[str, Any]) -> str:
    """A preview as lines of plain text (`fcapp train --preview`, the Train tab)."""
    tasks = ", ".join(f"{task} {n}" for task, n in facts["tasks"].items())
    lines = [f"{facts['method']} on {facts['source']}: {facts['rows']} {facts['row_word']} from {facts['problems']} "
             f"training problems ({tasks}); held-out problems: none (they never reach a training set)"]
    if facts["lengths"]:
        lengths = sorted(facts["lengths"])
        fate = ("" if not facts["too_long"] else " (dropped)" if facts["drop_too_long"]
                else " (the run would refuse them: raise max_length or switch on drop_too_long)")
        lines.append(f"tokens per row: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]} against "
                     f"max_length {facts['max_length']}; {facts['too_long']} too long{fate}")
    estimate = ("no time estimate for rounds (it depends on how many sampled chains are correct)"
                if facts["estimate_s"] is None else
                f"about {fmt_seconds(facts['estimate_s'])} of training (an estimate from {facts['estimate_basis']})")
    lines.append(f"{facts['steps']} optimizer steps, {facts['rows_trained']} {facts['trained_word']} trained on; {estimate}")
    return "\n".join(lines)


def prepare_training(config: TrainConfig, store: Any = None) -> Path:
    """Check the config and data (errors at once) and write the run folder, ready for a worker: its
    config.json is returned (`accelerate launch -m fcapp.training.worker --config` takes it too). A config
    with a task and no data file trains on the set built from `store` (default: the data folder's),
    written into the run folder as data.jsonl. A name already taken by a running run, a model or
    checkpoints is refused before anything is written."""
    out = config.out
    existing = read_json(out / "status.json")
    if existing and existing.get("status") not in TERMINAL and TrainingJob(out).poll()["status"] not in TERMINAL:
        raise RuntimeError(f"a training run is already going on in {out} (pid {existing.get('pid')})")
    if not config.resume and ((out / "model").exists() or (out / "checkpoints").exists()):
        raise FileExistsError(f"{out} already holds a model or checkpoints: choose another name, or resume=True")
    staging = out.with_name(f".{out.name}.data.jsonl") if config.method in ("sft", "dpo") and not config.data else None
    try:
        if staging is not None:
            from fcapp.store import Store

            build_data(config, store or Store(), staging)
            config.data = str(staging)
        validate(config)
    except BaseException:
        if staging is not None:
            config.data = None
            for leftover in (staging, staging.with_name(staging.name + ".card.md")):
                leftover.unlink(missing_ok=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    if staging is not None:  # the set goes into the run folder only once the run is sure to start
        config.data = str(out / "data.jsonl")
        os.replace(staging, config.data)
        os.replace(staging.with_name(staging.name + ".card.md"), out / "data.jsonl.card.md")
    for stale in ("STOP", "card.json") + (() if config.resume else ("log.jsonl",)):
        (out / stale).unlink(missing_ok=True)
    config_path = out / "config.json"
    atomic_write_json(config_path, config.to_dict())
    return config_path


def start_training(config: TrainConfig, store: Any = None) -> TrainingJob:
    """Prepare the run folder (`prepare_training`), then run it in a worker process of its own."""
    config_path = prepare_training(config, store)
    out = config.out
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", TRL_EXPERIMENTAL_SILENCE="1")
    with (out / "worker.log").open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "fcapp.training.worker", "--config", str(config_path)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # own process group: stop() can signal all of it
    atomic_write_json(out / "status.json", {"status": "starting", "pid": process.pid, "name": config.name, "updated": now(),
                                     "method": config.method})
    _CHILDREN[out.resolve()] = process
    return TrainingJob(out, process)


# ---- finding runs again -------------------------------------------------------------------------------------
def attach(name: str | Path) -> TrainingJob:
    """The job of a run folder (a path) or of a model name under models_dir(), running or not."""
    is_path = isinstance(name, Path) or os.sep in name
    out = Path(name) if is_path else models_dir() / safe_name(str(name), "model name")
    if not (out / "status.json").exists():
        raise FileNotFoundError(f"no training run in {out}")
    return TrainingJob(out, _CHILDREN.get(out.resolve()))


def list_runs() -> list[dict[str, Any]]:
    """Every run folder under models_dir() (started from the CLI or the app), newest first: name, method,
    status (a dead worker shows as failed), step, started, and the card's summary when it finished."""
    runs = []
    for status_path in models_dir().glob("*/status.json"):
        job = TrainingJob(status_path.parent, _CHILDREN.get(status_path.parent.resolve()))
        info, card, config = job.poll(), job.card, job.config
        runs.append({"name": job.name, "out": str(job.out), "method": config.get("method") or card.get("method"),
                     "task": config.get("task"), "base": config.get("base"), "status": info.get("status"),
                     "step": card.get("global_step", info.get("step")), "max_steps": info.get("max_steps"),
                     "started": card.get("started") or info.get("updated"), "train_seconds": card.get("train_seconds"),
                     "rows": (card.get("data") or {}).get("used"), "metrics": card.get("metrics") or {},
                     "error": info.get("error"), "mtime": status_path.stat().st_mtime})
    return sorted(runs, key=lambda r: r["mtime"], reverse=True)
