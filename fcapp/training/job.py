"""Training runs seen from outside their worker: start one, follow it, stop it, find it again.

`start_training(config)` checks everything it can before a process starts (the config, the base model,
the data: a broken or held-out-holding file fails at once, naming file and line), builds the training
set from the store when the config names a task instead of a file, then runs
`python -m fcapp.training.worker --config <out>/config.json` in its own process group. `attach(name)`
reconnects to a run (after a page reload) from its folder; `list_runs()` reads every run folder, so runs
started from the CLI and from the app show up alike.
"""

from __future__ import annotations

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
def build_data(config: TrainConfig, store: Any, target: Path) -> dict[str, Any]:
    """Write the training set of a `--task` config (no --data) from the store: pairs (dpo) or SFT examples
    (sft) of its training problems. Returns the set's card."""
    from fcapp.trainsets import PairPolicy, build_pairs, export_rows, make_examples

    if config.method == "sft":
        return make_examples(store, config.tasks, target)
    rows = [row for task in config.tasks for row in build_pairs(store, task, PairPolicy())]
    if not rows:
        from fcapp.trainsets import TrainingDataError

        raise TrainingDataError(f"no preference pairs for {config.task} yet: a pair needs a training problem with a "
                                "correct and an incorrect chain (generate chains, or label some)")
    export_rows(rows, target, "pairs", {"tasks": config.tasks, "pairs": len(rows)})
    return {"pairs": len(rows)}


def validate(config: TrainConfig) -> dict[str, Any]:
    """Everything checkable before a worker starts: the base model, the task, the data file (rows,
    held-out problems, lengths). Returns a summary: rows in the file and rows that will be used."""
    from fcapp.models.base import ModelError
    from fcapp.models.registry import resolve_model_path

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


def start_training(config: TrainConfig, store: Any = None) -> TrainingJob:
    """Check the config and data here (errors at once), then run it in a worker process. A config with a
    task and no data file trains on the set built from `store` (default: the data folder's), written
    into the run folder as data.jsonl. A name already taken by a running run, a model or checkpoints is
    refused before anything is written."""
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
