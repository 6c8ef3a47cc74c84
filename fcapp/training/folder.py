"""The run folder: the one record of a training run, written by its worker, read by anyone.

`<out>/` holds `config.json` (the TrainConfig), `status.json` (starting / running / finished / stopped /
failed, with pid, stage, step, ETA or error), `log.jsonl` (one line per logged step, each with its
`stage`: sft, dpo, grpo, round), `card.json` (what was trained on what, with the final metrics),
`model/` (the tuned model), `checkpoints/`, `worker.log`, and a `STOP` file when a stop was asked for.
Only the main process (rank 0) writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from fcapp.files import atomic_write_json, read_log


class StopSignal(Protocol):
    def is_set(self) -> bool: ...


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None while it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


@dataclass
class TrainResult:
    status: str  # finished | stopped | failed
    out_dir: Path
    model_dir: Path | None  # None when nothing was saved (stopped before the first step)
    global_step: int
    metrics: dict[str, Any]
    train_seconds: float = 0.0
    card: dict[str, Any] = field(default_factory=dict)


class RunFolder:
    """The worker's view of its folder: log, status, card, stop requests (only rank 0 writes)."""

    def __init__(self, out: Path, name: str, stop_event: StopSignal | None = None,
                 on_log: Callable[[dict], None] | None = None, main: bool = True) -> None:
        self.out, self.name, self.main = out, name, main
        self.stop_event, self.on_log = stop_event, on_log
        self.log_path, self.status_path, self.stop_path = out / "log.jsonl", out / "status.json", out / "STOP"
        self.stopped = False
        self.last: dict[str, Any] = {}

    def stop_requested(self) -> bool:
        return bool(self.stop_event is not None and self.stop_event.is_set()) or self.stop_path.exists()

    def status(self, status: str, **extra: Any) -> None:
        if self.main:
            atomic_write_json(self.status_path, {"status": status, "pid": os.getpid(), "name": self.name,
                                          "updated": now(), **extra})

    def write_card(self, card: dict[str, Any]) -> None:
        if self.main:
            atomic_write_json(self.out / "card.json", card)

    def keep_log(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite log.jsonl with the records `keep` accepts (a resumed run redoes the rest)."""
        if self.main:
            records = [r for r in read_log(self.log_path) if keep(r)]
            self.log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it has stage, step, max_steps, eta_s) and report it in status.json."""
        self.last = record
        if self.main:
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            self.status("running", stage=record["stage"], step=record["step"], max_steps=record["max_steps"],
                        eta_s=record.get("eta_s"), round=record.get("round"))
        if self.on_log is not None:
            self.on_log(record)
